"""The mesh of a run (`config.parallel`), shared by every stage's base config; see
ldm_jax/parallel.py and ldm_jax/sharding_rules.py."""


def parallel_section() -> dict:
    return dict(
        data=-1,                # devices along the data axis; -1: all the fsdp axis leaves
        fsdp=1,                 # devices each parameter, EMA and optimiser leaf is split over
                                # (ZeRO-3 style); 1 replicates them (pure data parallelism)
        fsdp_min_size=2 ** 16,  # leaves with fewer elements stay replicated: gathering them
                                # costs more time than their copies cost memory
    )
