"""Which train-state leaves are split over the mesh's `fsdp` axis, and along which axis.

Each rule is (regex, placement). A leaf's path is its keys joined by "/", e.g.
"params/unet/down0_res0/conv1/kernel" or "opt_state/1/0/mu/unet/down0_res0/conv1/kernel": the
optimiser's moments and the EMA carry the parameter's own path, so one rule places all three.
The first rule whose regex `re.search`es the path and whose placement fits the leaf wins:
  - REPLICATE: a full copy on every device;
  - LARGEST: split the largest axis the fsdp size divides (ties: the last such axis);
  - a PartitionSpec naming FSDP on one axis: fits when it has one entry per axis of the leaf
    and the fsdp size divides that axis.
A leaf no rule fits, a scalar, and a leaf smaller than parallel.fsdp_min_size are replicated.
Every leaf is replicated along the `data` axis; only `fsdp` splits it.
"""
from jax.sharding import PartitionSpec as P

FSDP = "fsdp"
REPLICATE = P()
LARGEST = "largest"

RULES = (
    # Biases, norm scales and offsets: tiny, and read whole by every op that uses them.
    (r"(^|/)(bias|scale)$", REPLICATE),
    # HWIO convolution kernels: split the output channels, so a gathered slice is contiguous.
    (r"(^|/)kernel$", P(None, None, None, FSDP)),
    # Dense kernels, embeddings and anything else: the largest axis that divides.
    (r".*", LARGEST),
)
