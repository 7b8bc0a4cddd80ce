"""lit_star: training suite for STAR (Stacked AutoRegressive Scheme for Unified Multimodal Learning).

    python -m lit_star --help
"""

__version__ = "0.1.0"
