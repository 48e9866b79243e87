"""selfrm: self-training for LLM reward models (SSRM and SER), in plain PyTorch."""
import torch

# fully_shard (FSDP2) is public in torch.distributed.fsdp from torch 2.6 on; an older torch
# would fail on that import with a traceback that does not say what to install.
if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
    raise SystemExit(f"error: selfrm needs torch >= 2.6 (for torch.distributed.fsdp.fully_shard); this is torch "
                     f"{torch.__version__}: pip install 'torch>=2.6'")
