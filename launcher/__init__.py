"""launcher: one recipe → validated plan → torchrun / sbatch / local CPU fine-tuning."""

__version__ = "0.1.0"
