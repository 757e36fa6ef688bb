"""Shorthand dataset names: `data.name = "cifar10"` stands for the tfds source with
tfds_name "cifar10" (older workdirs say so). Every reader of the data config, the config
checks included, sees it spelled out through `resolve`."""

# What the shorthand data.name="cifar10" stands for.
_SHORTHANDS = {"cifar10": dict(tfds_name="cifar10", image_key="image", label_key="label")}


def resolve(data):
    """`data` with a shorthand name spelled out as the tfds source it names (a copy); any
    other data config unchanged."""
    fields = _SHORTHANDS.get(data.name)
    if fields is None:
        return data
    data = data.copy_and_resolve_references()
    with data.unlocked():  # a workdir saved before these fields existed lacks them
        data.name = "tfds"
        data.update(fields)
    return data
