"""The pipeline: distributed pretraining of CLIP, ImageGPT and ViT (see ../shared/DESIGN.md)."""
import os

# The image's network is closed: stop libraries phoning home at import time (albumentations via img2dataset).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
