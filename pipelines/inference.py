"""The encode job's model step: the document tower as a Beam RunInference model handler.

This module owns how a batch of texts becomes embeddings: :class:`DocumentTowerHandler` (the
exported SavedModel's ``embed_document``, loaded once per worker), :class:`KeyedTowerHandler` (its
keyed form, with RunInference's own batching skipped) and :class:`EncodeBatches`, which runs it over
the keyed examples :class:`~pipelines.corpus_batches.ReadBatches` emits, through RunInference or,
with ``--inference pardo``, a plain DoFn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

__all__ = ["DocumentTowerHandler", "KeyedTowerHandler", "EncodeBatches"]


class DocumentTowerHandler(ModelHandler[Sequence[str], PredictionResult, Any]):
    """RunInference handler for the exported document tower: one batch of texts → [n, dim] float32.

    An *example* is a whole batch of texts (the job forms batches where it reads them, see
    :class:`ReadBatches`), so RunInference's own ``BatchElements`` is skipped (it would only regroup
    the batches, and it emits its last group from ``finish_bundle``, which Beam's Dask runner drops):
    each element reaching RunInference is then a ready "batch" of one keyed example,
    ``[(key, texts)]``. The model is the SavedModel under
    ``MODEL_DIR/saved_model`` loaded with :func:`dssm.export.load_encoder` (which verifies the
    model's manifest), so Beam, the searcher and the tests all run the same ``embed_document``.

    Args:
        model_dir: the model directory.
        call_size: texts per SavedModel call (a batch is cut into calls of this size). 4096 took about
            9% less CPU per document than the encoder's default 1024 on quora-length texts (in-process
            A/B on 100k texts, 3 alternating runs each: 37.4 vs 41.3 µs/doc).
    """

    def __init__(self, model_dir: str, *, call_size: int = 4096):
        super().__init__()
        self.model_dir = str(model_dir)
        self.call_size = call_size

    def load_model(self) -> Any:
        # deferred: TensorFlow, imported only when this runs
        from dssm.export import load_encoder

        return load_encoder(self.model_dir, batch_size=self.call_size)

    def run_inference(self, batch: Sequence[Sequence[str]], model: Any,
                      inference_args: dict[str, Any] | None = None) -> list[PredictionResult]:
        return [PredictionResult(texts, np.asarray(model.embed_documents(list(texts)), dtype=np.float32))
                for texts in batch]

    def get_num_bytes(self, batch: Sequence[Sequence[str]]) -> int:
        return sum(len(text.encode("utf-8")) for texts in batch for text in texts)

    def get_metrics_namespace(self) -> str:
        return "dssm_document_tower"

    def should_skip_batching(self) -> bool:
        return True


class KeyedTowerHandler(KeyedModelHandler):
    """``KeyedModelHandler(DocumentTowerHandler(model_dir))`` that also passes on ``should_skip_batching``.

    Beam 2.77's ``KeyedModelHandler`` forwards ``batch_elements_kwargs`` but not
    ``should_skip_batching``, so RunInference put a ``BatchElements`` before the model anyway: it held
    up to 8 of our batches (tens of thousands of documents) per bundle, and on the Dask runner lost the
    ones it emits from ``finish_bundle``.
    """

    def __init__(self, model_dir: str):
        self.tower = DocumentTowerHandler(model_dir)
        super().__init__(self.tower)

    def should_skip_batching(self) -> bool:
        return self.tower.should_skip_batching()


def _from_prediction(keyed: tuple[Any, PredictionResult]) -> tuple[int, list[dict], list[dict], np.ndarray]:
    (batch_id, docs, rejected), result = keyed
    return batch_id, docs, rejected, result.inference


class EncodeBatches(beam.PTransform):
    """``[((batch_id, docs, rejected), texts)]`` → ``(batch_id, docs, rejected, embeddings)``.

    Each example is one RunInference call over a :class:`KeyedTowerHandler` (a
    :class:`~apache_beam.ml.inference.base.KeyedModelHandler` of :class:`DocumentTowerHandler`);
    ``embeddings`` is ``[len(docs), dim]`` float32, row i for ``texts[i]``. Dead letters ride along in
    their batch so the job stays one chain (the Dask runner computes only the last transform's graph).
    """

    def __init__(self, model_dir: str, *, use_run_inference: bool = True):
        super().__init__()
        self.handler = KeyedTowerHandler(model_dir)
        self.use_run_inference = use_run_inference

    def expand(self, examples: beam.PCollection) -> beam.PCollection:
        return (
            examples
            | ("RunInference" >> RunInference(self.handler) if self.use_run_inference
               else "Inference" >> beam.ParDo(_PlainInference(self.handler)))
            | "FromPrediction" >> beam.Map(_from_prediction)
        )


class _PlainInference(beam.DoFn):
    """The same keyed model handler called from a plain DoFn (model loaded in ``setup``).

    ``--inference pardo``: a fallback for runners where RunInference misbehaves (on Beam 2.77's Dask runner
    it lost batches while its ``BatchElements`` was not skipped; see docs/scaling.md).
    """

    def __init__(self, handler: KeyedModelHandler):
        super().__init__()
        self.handler = handler
        self.model: Any = None

    def setup(self) -> None:
        self.model = self.handler.load_model()

    def process(self, batch: list[tuple[Any, list[str]]]) -> Iterable[tuple[Any, PredictionResult]]:
        yield from self.handler.run_inference(batch, self.model)
