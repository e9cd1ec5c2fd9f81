"""The trainer: ``python -m train.crossbatch --config configs/X.yaml`` (see ``train/README.md``)."""
