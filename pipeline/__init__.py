"""The pipeline: distributed pretraining of CLIP, ImageGPT and ViT (see ../shared/DESIGN.md)."""
import hashlib
import os
import sys

# The image's network is closed: stop libraries phoning home at import time (albumentations via img2dataset).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# DeepSpeed JIT-builds C++ ops into ~/.cache/torch_extensions; the build hashes the include paths, so two
# virtualenvs sharing that folder rebuild over each other at every start (30-150 s). One folder per environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.path.expanduser("~/.cache/torch_extensions"), hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]))
