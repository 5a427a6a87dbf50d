"""SkyMoE-JAX: a JAX/Flax reimplementation of SkyMoE (arXiv 2512.02517)."""
from setuptools import find_packages, setup

# Versions known to install together on Python 3.11 (docs/design.md, Environment).
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'tensorflow-cpu==2.21.0',
    'tensorflow-datasets==4.9.10',
    'array_record==0.8.6',     # tfds datasets as ArrayRecord, read by random access
    # Bucket paths (storage.py): epath's fsspec backend for GCS (EPATH_USE_TF=false).
    'gcsfs==2026.10.1',
    'sentencepiece==0.2.3',
    'ml_collections==1.1.0',
    'clu==0.0.12',
    'einops==0.8.2',
    'safetensors==0.8.0',      # checkpoint import and export (interop/)
    # Attention and grouped-matmul kernels for GPU and TPU (model/attention.py, model/moe/).
    'tokamax==0.0.12',
    'numpy==2.4.6',
    'pillow==12.3.0',          # image decoding and resizing (gradio 6 needs pillow < 13)
    'matplotlib==3.11.2',      # routing heatmaps
    # Caption metrics (BLEU, ROUGE-L, CIDEr-D; METEOR 1.5 when java is on PATH).
    'pycocoevalcap==1.2',
    'pycocotools==2.0.11',
    # clu's writers and tfds use these without declaring them.
    'tensorboard==2.21.0',
    'importlib_resources==7.1.0',
]

EXTRAS_REQUIRE = {
    # import-linter: the package's layer contract (.importlinter), checked by tests/test_layers.py.
    'test': ['pytest==9.2.0', 'import-linter==2.16', 'selenium==4.51.0',
           'gcp-storage-emulator==2026.7.19'],   # a local GCS server for the bucket tests
    # PyTorch export and the parity tests against HF transformers.
    # gguf + accelerate: the GGUF reader and transformers' GGUF loading in the parity test.
    'export': ['torch==2.13.0', 'transformers==5.24.0', 'gguf==0.19.0', 'accelerate==1.15.0',
               'peft==0.21.2'],
    # The web demo (python -m skymoe_jax.demo).
    'demo': ['gradio==6.31.0', 'gradio_client==2.7.2'],
    # The `tfds` console script: tensorflow-datasets 4.9.10's CLI imports apache_beam and
    # mlcroissant at start-up even when no Beam pipeline runs. apache-beam pins protobuf < 7,
    # which breaks transformers' tokenizer conversion (export extra): use a venv of its own, or
    # `python data_prep/tfds_build.py build ...`, tfds' own build command without that import.
    'data': ['apache-beam==2.77.0', 'mlcroissant==1.1.1'],
    'tpu': ['jax[tpu]==0.10.2'],
    'gpu': ['jax[cuda12]==0.10.2'],
}

setup(
    name='skymoe_jax',
    version='0.1.0',
    description='SkyMoE remote-sensing vision-language MoE in JAX/Flax',
    packages=find_packages(include=['skymoe_jax', 'skymoe_jax.*']),
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
