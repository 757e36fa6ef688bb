"""The data fields of user-supplied sources (data.name = folder | webdataset), shared by every
stage's base config; see ldm_jax/data/folder_source.py and webdataset_source.py."""


def source_fields() -> dict:
    return dict(
        path="",                # folder: the image folder; webdataset: the .tar shards (a list
                                # with commas and/or a brace pattern "shards/{000000..000099}.tar")
        manifest="",            # folder: a .csv/.jsonl of path,caption[,label] instead of a scan
        caption_key="caption",  # webdataset: the .json field with the caption when no .txt;
                                # tfds: the Text feature read as the caption, where it exists
        crop="center",          # center | random: the square crop after resizing the shorter side
        min_size=0,             # folder: drop images whose shorter side is smaller (0: keep)
        max_aspect=0.0,         # folder: drop images with long/short above this (0: keep)
        filters="",             # webdataset: metadata filters, e.g. "aesthetic_score>=5,pwatermark<=0.5"
        num_val=0,              # folder: the last files (sorted by path) held out as validation
        class_names=(),         # folder: filled in by training from the class sub-folders, so
                                # the workdir keeps them (sample.py --class=NAME)
    )
