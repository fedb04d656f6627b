"""robustitm: robust image-text matching under noisy correspondence (flat modules, torch only at run time)."""
from setuptools import setup

setup(
    name="robustitm",
    version="0.1.0",
    description="Reference implementation of robust image-text matching with noisy correspondence "
    "(GMM filtering + dynamic margins, MSCN meta correction, clustered uni/cross-modal contrastive "
    "learning).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    py_modules=["robustitm", "dual_encoder", "text_tokenizers", "pairs", "batches", "gmm", "losses", "meta",
                "retrieval_eval", "run_outputs"],
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy>=1.22", "pillow>=9.0"],
    extras_require={"parquet": ["pyarrow>=12"],
                    "test": ["pytest>=7", "scikit-learn>=1.2", "transformers>=4.40", "open_clip_torch>=2.20",
                             "torchvision>=0.16", "sentence-transformers>=6", "pyarrow>=12"]},
    entry_points={"console_scripts": ["robustitm = robustitm:cli"]},
    license="MIT",
)
