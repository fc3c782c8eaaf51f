"""CNN embedding: a metric-learned network fitted in the flow, run with onnxruntime.

Three nodes and one plain function:

* ``embedder`` (set node, the fit): trains a small CNN from scratch on the
  labeled items (no downloaded weights) and returns it exported to ONNX as a
  :class:`Blob`.  The metric loss is a soft-label pairwise regression: for
  every pair in a batch, the squared difference between the cosine of the
  two L2-normalized embeddings and the Jaccard index of their label sets
  (items sharing all findings are pulled together, items sharing none are
  pushed to orthogonal, partial overlaps land in between).  ``loss="ms"``
  selects multi-similarity instead (positives share a finding, negatives
  none); ``cls_weight`` adds a multi-label head on the embedding, trained
  jointly by binary cross-entropy.
* ``embedder_from_weights`` (set node): the same output from a user's own
  weights file -- an ONNX model used as it is, or a torch ``state_dict`` of
  our network, exported like a trained one.
* ``embedding`` (batched item node): L2-normalized float32 vectors from the
  ONNX model with onnxruntime alone; torch is not imported on this path, so a
  query starts fast.  ``embed_one`` is the same for one image.

What the index searches (``vectors=``).  By default (``"findings"``) the
exported model gives each image its *findings vector*: the head's finding
probabilities p, in the database form of ``_cnn.findings_model`` (unit
length, one extra coordinate), and a query ranks the database by the inner
product ``p_q . p_r`` -- the expected number of shared findings, which is
what AvG@K counts -- through the same cosine indices (the query's extra
coordinate is set to 0 by the Retriever: the ``"query": "mips"`` of the
embedder's output).  The metric embedding under the head is still trained
by the pair loss.  Patient-grouped cross-validation on nih-dev ``train``
only (3 of 5 folds, a fold's queries against the other folds' items as
database, the network trained on those; ``bench/cv_nih.py --embedding``):
AvG@10 0.512 for findings vectors by inner product, 0.480 for the same
network's embedding by cosine, 0.474 for findings vectors by cosine, 0.469
for the label-prior ranking.  ``vectors="embedding"`` gives the embedding itself.

Other defaults, chosen by the same cross-validation earlier: width 32, 80
epochs, no augmentation.  The index's database is the training set itself, so a network
that fits its training items tightly (final loss near 0.01) places the
database at clean label clusters; augmentation kept it from doing so within
the epoch budget and lowered AvG@10 (0.40/0.34/0.45 vs 0.40/0.39/0.47 on
three folds).  ``augment=True`` gives a small affine warp and intensity
jitter, never flips: a mirrored chest radiograph puts the heart on the
wrong side, which is anatomy the network should not learn to ignore.

Determinism.  Training pins torch (deterministic kernels, ``_TORCH_THREADS``
threads, a private RNG seeded from ``seed``, data order from ``seed``) and
restores the caller's settings afterwards; the export uses the legacy
TorchScript exporter, which writes the same bytes for the same weights.
Inference runs each image on its own (a batch of one) in a single-threaded
onnxruntime session, so an image's vector never depends on the batch it
came in, its size, or the machine's core count (batched runs happened to
match bitwise too on this CPU, and were no faster: about 1,800 images/s
per item vs 1,300 in batches of 50).  Bit-identity is promised for one CPU
kind: another instruction set (AVX2 vs AVX-512) may pick other kernels and
change the last bits.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from flow import Blob, ItemError, Items, node
from nodes import _cnn
from nodes._labels import label_tuple
from nodes.metrics import label_matrix

__all__ = ["embed_one", "embedder", "embedder_from_weights", "embedding"]

_TORCH_THREADS = 1  # faster than 2 on a shared 2-core box, and one per Dask worker
_MIN_SIZE = 16  # the network halves the image four times
_TORCH_ZIP_MAGIC = b"PK\x03\x04"


# --------------------------------------------------------------------------
# fitting


def _training_set(images: Items, labels: Items) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The labeled images (N x S x S float32), their multi-hot labels and the
    label vocabulary; items are matched by id, unlabeled ones left out."""
    by_id = {}
    for item_id, value in zip(labels.ids, labels.values, strict=True):
        by_id[item_id] = label_tuple(value, item_id)
    xs, ys = [], []
    shape = None
    for item_id, img in zip(images.ids, images.values, strict=True):
        labs = by_id.get(item_id, ())
        if not labs:
            continue
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim != 2 or min(arr.shape) < _MIN_SIZE:
            raise ValueError(
                f"image {item_id!r} has shape {arr.shape}; the embedder needs square 2-D "
                f"images of at least {_MIN_SIZE}x{_MIN_SIZE}"
            )
        if shape is None:
            shape = arr.shape
        if arr.shape != shape or arr.shape[0] != arr.shape[1]:
            raise ValueError(
                f"image {item_id!r} has shape {arr.shape}, the others {shape}; the embedder "
                "needs square images of one size (normalize them first)"
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"image {item_id!r} has NaN or infinite pixels")
        xs.append(arr)
        ys.append(labs)
    if len(xs) < 2:
        raise ValueError(
            f"the embedder needs at least 2 labeled images, got {len(xs)} "
            f"(of {len(images)} images, {len(labels)} label entries)"
        )
    y, vocab = label_matrix(ys)
    return np.stack(xs), y, vocab


_VECTORS = ("findings", "embedding")


@node(version=2, kind="set")
def embedder(
    images: Items,
    labels: Items,
    *,
    dim: int = 64,
    width: int = 32,
    epochs: int = 80,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    loss: str = "regression",
    margin: float = 0.1,
    cls_weight: float = 1.0,
    augment: bool = False,
    vectors: str = "findings",
    seed: int = 0,
) -> dict:
    """A CNN trained by metric learning (and a multi-label head) on the labeled items.

    ``images``: normalized (S, S) float32 arrays in [0, 1]; ``labels``: a
    tuple of label strings per item (empty: unlabeled, not used).
    ``vectors``: what the exported model gives per image -- ``"findings"``
    (the head's finding probabilities in database form, searched by inner
    product: see the module notes) or ``"embedding"`` (the metric embedding,
    searched by cosine).  Returns ``{"model": Blob(ONNX, N x 1 x S x S -> N x
    D), "dim": D, "size", "vectors", "query", "labels", ...}``; ``"query"`` is
    ``"mips"`` when query vectors take :func:`nodes._cnn.query_form`.
    """
    if dim < 2 or width < 1 or epochs < 0 or batch_size < 2:
        raise ValueError("embedder needs dim >= 2, width >= 1, epochs >= 0, batch_size >= 2")
    if loss not in ("regression", "ms"):
        raise ValueError(f"embedder loss must be 'regression' or 'ms', not {loss!r}")
    if vectors not in _VECTORS:
        raise ValueError(f"embedder vectors must be one of {', '.join(_VECTORS)}, not {vectors!r}")
    if vectors == "findings" and cls_weight <= 0:
        raise ValueError("embedder vectors='findings' needs cls_weight > 0 (the head is trained)")
    x, y, vocab = _training_set(images, labels)
    state, final_loss = _cnn.trained_network(
        x,
        y,
        dim=dim,
        width=width,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        loss=loss,
        margin=margin,
        cls_weight=cls_weight,
        augment=augment,
        seed=seed,
        threads=_TORCH_THREADS,
    )
    findings = vectors == "findings"
    model = _cnn.onnx_bytes(state, dim=dim, size=x.shape[-1], findings=findings)
    return {
        "model": Blob(model),
        "dim": len(vocab) + 1 if findings else dim,
        "vectors": vectors,
        "query": "mips" if findings else "same",
        "size": int(x.shape[-1]),
        "epochs": epochs,
        "final_loss": final_loss,
        "n_train": len(x),
        "labels": tuple(vocab),
        "source": "trained",
    }


# --------------------------------------------------------------------------
# a user's own weights


def _refuse_external_data(model: bytes) -> None:
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.ModelProto.FromString(model)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ItemError(f"the weights file is not a loadable ONNX model: {e}") from None

    def graphs(g):
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from graphs(a.g)
                for sub in a.graphs:
                    yield from graphs(sub)

    for g in graphs(proto.graph):
        tensors = list(g.initializer) + [s.values for s in g.sparse_initializer]
        for n in g.node:
            tensors += [a.t for a in n.attribute if a.HasField("t")]
        for t in tensors:
            if uses_external_data(t):
                raise ItemError(
                    f"the ONNX model keeps tensor {t.name!r} in external data; "
                    "embed the weights in the one file (onnx.save_model(..., "
                    "save_as_external_data=False))"
                )


def _checked_onnx(model: bytes, *, dim: int, size: int) -> None:
    """Raise ItemError unless ``model`` maps 1 x 1 x size x size to 1 x dim.

    A model whose tensors live in external files is refused: onnxruntime would
    read them from the worker's current folder, outside the recipe's key (the
    model would differ per worker, and could read any local file)."""
    _refuse_external_data(model)
    try:
        session = _new_session(model)
    except Exception as e:  # onnxruntime raises its own exception types
        raise ItemError(f"the weights file is not a loadable ONNX model: {e}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ItemError(
            f"the ONNX model must have one input (N x 1 x {size} x {size}), "
            f"it has {len(inputs)} inputs and {len(outputs)} outputs"
        )
    shape = inputs[0].shape
    fixed = [d if isinstance(d, int) else None for d in shape]
    if (
        len(shape) != 4
        or fixed[1] not in (None, 1)
        or any(d not in (None, size) for d in fixed[2:])
    ):
        raise ItemError(
            f"the ONNX model's input has shape {shape}; expected N x 1 x {size} x {size}"
        )
    if fixed[0] not in (None, 1):
        raise ItemError(f"the ONNX model's input has a fixed batch of {fixed[0]}; need 1 or N")
    try:
        out = session.run(None, {inputs[0].name: np.zeros((1, 1, size, size), np.float32)})[0]
    except Exception as e:
        raise ItemError(f"the ONNX model fails on a 1 x 1 x {size} x {size} input: {e}") from None
    if out.shape != (1, dim):
        raise ItemError(
            f"the ONNX model's output for one image has shape {out.shape}; expected (1, {dim})"
        )


@node(version=1, kind="set")
def embedder_from_weights(weights: bytes, *, dim: int = 64, size: int = 64) -> dict:
    """An embedder from a local weights file's bytes: an ONNX model (N x 1 x
    size x size -> N x dim), or a torch ``state_dict`` of our network."""
    data = getattr(weights, "data", weights)
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise ItemError("the weights file is empty or not bytes")
    data = bytes(data)
    if data[:4] == _TORCH_ZIP_MAGIC or data[:2] == b"\x80\x02":
        try:
            state = _cnn.state_dict_from(data)
        except Exception as e:
            raise ItemError(f"the weights file is a torch file but not loadable: {e}") from None
        try:
            model = _cnn.onnx_bytes(state, dim=dim, size=size)
        except Exception as e:
            raise ItemError(
                f"the state_dict does not fit the flow embedding network with dim={dim}: {e}"
            ) from None
        source = "state_dict"
    else:
        model = data
        source = "onnx"
    _checked_onnx(model, dim=dim, size=size)
    return {
        "model": Blob(model),
        "dim": dim,
        "size": size,
        "epochs": 0,
        "final_loss": None,
        "n_train": 0,
        "labels": (),
        "vectors": "embedding",
        "query": "same",
        "source": source,
    }


# --------------------------------------------------------------------------
# inference (onnxruntime only)

_SESSIONS: OrderedDict[bytes, Any] = OrderedDict()
_SESSIONS_LOCK = threading.Lock()
_SESSIONS_MAX = 4


def _new_session(model: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _session(model: bytes):
    """A cached single-threaded session for ``model`` (keyed by its hash)."""
    digest = hashlib.blake2b(model, digest_size=16).digest()
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(digest)
        if session is not None:
            _SESSIONS.move_to_end(digest)
            return session
    session = _new_session(model)
    with _SESSIONS_LOCK:
        _SESSIONS[digest] = session
        while len(_SESSIONS) > _SESSIONS_MAX:
            _SESSIONS.popitem(last=False)
    return session


def _model_bytes(embedder: dict) -> bytes:
    model = embedder["model"] if isinstance(embedder, dict) else embedder
    return bytes(getattr(model, "data", model))


def _vector(session, image: Any, size: int | None) -> np.ndarray:
    """One image's L2-normalized float32 embedding (a batch of one)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    inp = session.get_inputs()[0]
    want = size if size is not None else inp.shape[-1]
    if arr.ndim != 2 or (isinstance(want, int) and arr.shape != (want, want)):
        raise ItemError(f"image has shape {arr.shape}; the embedder expects ({want}, {want})")
    if not np.isfinite(arr).all():
        raise ItemError("image has NaN or infinite pixels")
    out = session.run(None, {inp.name: np.ascontiguousarray(arr[None, None])})[0]
    vec = np.asarray(out, dtype=np.float32).reshape(-1)
    norm = np.sqrt(np.sum(vec.astype(np.float64) ** 2))
    if not np.isfinite(norm) or norm == 0:
        raise ItemError("the network's embedding of this image is zero or not finite")
    return (vec / norm).astype(np.float32)


def embed_one(image: np.ndarray, model_bytes: bytes) -> np.ndarray:
    """The L2-normalized embedding of one (S, S) image under an ONNX model."""
    return _vector(_session(bytes(model_bytes)), image, None)


@node(version=1, batched=True, batch_size=256)
def embedding(images: list, embedder: dict) -> list:
    """L2-normalized float32 vectors (length ``dim``), one per image, computed
    image by image so that a vector never depends on its batch."""
    session = _session(_model_bytes(embedder))
    size = embedder.get("size") if isinstance(embedder, dict) else None
    return [_vector(session, img, size) for img in images]
