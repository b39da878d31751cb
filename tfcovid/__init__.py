"""tfcovid: fine-tune ImageNet backbones to classify chest X-rays (not for clinical use)."""
__version__ = "0.1.0"
