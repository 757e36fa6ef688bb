"""Reading PyTorch weight files without running pickled code."""
from __future__ import annotations

import pickle


def load_torch_state_dict(path: str, what: str = "") -> dict:
    """The state dict in a torch file, loaded with `weights_only=True` (tensors only; anything
    else is refused). `what` names the file's role in error messages."""
    import torch
    prefix = f"{what}: " if what else ""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{prefix}{path} is not a plain state dict of tensors; refusing to "
                         f"unpickle anything else ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{prefix}{path} holds a {type(sd).__name__}, not a state dict")
    return sd
