"""st: find super tickets in pre-trained BERT models (Liang et al., ACL 2021)."""

__version__ = "0.1.0"
