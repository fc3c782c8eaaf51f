"""The torch side of the CNN embedding: network, augmentation, loss, training, export.

torch is imported inside the functions, never at module level, so that
``nodes.embed`` (which imports this module so that the code fingerprint of
its fit nodes covers the training code) stays cheap to import for the query
path, which runs the exported network with onnxruntime alone.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import OrderedDict

import numpy as np

from flow import progress
from nodes._threads import POOLS

# Training changes process-wide torch state (threads, deterministic mode):
# it holds the fits' lock (nodes._threads), so fits in threads of one process
# run one at a time.


def network(dim: int, width: int, size: int):
    """The embedding network for S x S images (S = ``size``): a stride-2 5x5
    stem (and a max-pool when S >= 48), three conv-BN-ReLU-max-pool blocks
    doubling the channels, global average pooling and a linear projection
    to ``dim``.  Input N x 1 x S x S (S >= 16), output N x dim."""
    from torch import nn

    layers: OrderedDict = OrderedDict()
    layers["stem"] = nn.Conv2d(1, width, 5, stride=2, padding=2, bias=False)
    layers["stem_bn"] = nn.BatchNorm2d(width)
    layers["stem_relu"] = nn.ReLU(inplace=True)
    if size >= 48:
        layers["stem_pool"] = nn.MaxPool2d(2)
    c_in = width
    for i in range(3):
        c = 2 * c_in
        layers[f"conv{i}"] = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"relu{i}"] = nn.ReLU(inplace=True)
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        c_in = c
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flat"] = nn.Flatten()
    layers["embed"] = nn.Linear(c_in, dim)
    return nn.Sequential(layers)


def findings_model(net, head):
    """``net`` followed by its multi-label ``head``, exported as database-form
    *findings vectors*: the finding probabilities ``p = sigmoid(head(net(x)))``
    (L labels) with one more coordinate ``sqrt(L - |p|^2)``, all over
    ``sqrt(L)``.  Every such vector has length 1, and a query vector with its
    last coordinate set to 0 ranks them by cosine exactly as by the inner
    product ``p_q . p_r`` -- the expected number of findings two images share
    if ``p`` are the findings' probabilities (the maximum-inner-product to
    cosine reduction, with the constant bound ``L`` on ``|p|^2``, so it holds
    across index segments built at different times)."""
    import torch
    from torch import nn

    class FindingsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.head = net, head

        def forward(self, x):
            p = torch.sigmoid(self.head(self.net(x)))
            n = float(p.shape[1])
            rest = torch.sqrt(torch.clamp(n - (p * p).sum(1, keepdim=True), min=0.0))
            return torch.cat([p, rest], 1) / (n**0.5)

    return FindingsNet()


def query_form(vectors: np.ndarray) -> np.ndarray:
    """Database-form findings vectors (rows) as queries: the last coordinate 0."""
    q = np.array(vectors, dtype=np.float32, copy=True)
    q[..., -1] = 0
    return q


def width_of(state_dict: dict) -> int:
    """The ``width`` a state_dict of :func:`network` was made with."""
    w = state_dict.get("stem.weight")
    if w is None or w.ndim != 4 or w.shape[1] != 1:
        raise ValueError("not a state_dict of the flow embedding network (no stem.weight)")
    return int(w.shape[0])


@contextlib.contextmanager
def _pinned_torch(threads: int):
    """Deterministic kernels, a fixed thread count and a private global RNG
    while inside; the caller's settings are restored afterwards."""
    import torch

    with POOLS:
        old_threads = torch.get_num_threads()
        old_det = torch.are_deterministic_algorithms_enabled()
        old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        try:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(True)
            with torch.random.fork_rng(devices=[]):
                yield
        finally:
            torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
            torch.set_num_threads(old_threads)


def _augmented(x, gen, *, shift: float, rotate: float, scale: float, jitter: float):
    """A random small affine warp and intensity jitter of a batch N x 1 x S x S.

    No flips: a mirrored chest radiograph puts the heart on the wrong side,
    which is anatomy the network should not learn to ignore.
    """
    import torch
    import torch.nn.functional as F

    n = x.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = uniform(-rotate, rotate) * (np.pi / 180)
    s = 1 + uniform(-scale, scale)
    tx, ty = uniform(-shift, shift) * 2, uniform(-shift, shift) * 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter > 0:
        contrast = (1 + uniform(-jitter, jitter)).view(n, 1, 1, 1)
        bright = uniform(-jitter, jitter).view(n, 1, 1, 1) / 2
        gamma = torch.exp(uniform(-jitter, jitter)).view(n, 1, 1, 1)
        x = x.clamp(0, 1) ** gamma
        x = ((x - 0.5) * contrast + 0.5 + bright).clamp(0, 1)
    return x


def _ms_loss(emb, sim_labels, *, alpha: float, beta: float, base: float, margin: float):
    """Multi-similarity loss (Wang et al., CVPR 2019) over a batch.

    ``sim_labels`` (N x N, in [0, 1]) is the label similarity of each pair:
    pairs with similarity > 0 are positives, = 0 negatives.  Pairs are mined
    with ``margin`` as in the paper; positives are weighted by their label
    similarity so that sharing more findings pulls harder.
    """
    import torch

    sim = emb @ emb.T
    n = sim.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    pos = (sim_labels > 0) & ~eye
    neg = sim_labels == 0
    big = torch.tensor(1e4, dtype=sim.dtype)
    # mining: a negative counts if it is closer than the hardest positive + margin,
    # a positive if it is farther than the hardest negative - margin
    hardest_pos = torch.where(pos, sim, big).min(1, keepdim=True).values
    hardest_neg = torch.where(neg, sim, -big).max(1, keepdim=True).values
    neg_keep = neg & (sim + margin > hardest_pos)
    pos_keep = pos & (sim - margin < hardest_neg)
    w = sim_labels.clamp(min=1e-6)
    pos_term = torch.where(pos_keep, w * torch.exp(-alpha * (sim - base)), 0.0).sum(1)
    neg_term = torch.where(neg_keep, torch.exp(beta * (sim - base)), 0.0).sum(1)
    loss = torch.log1p(pos_term) / alpha + torch.log1p(neg_term) / beta
    has = pos.any(1) & neg.any(1)
    return loss[has].mean() if bool(has.any()) else loss.sum() * 0


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list:
    """One epoch of batches: a seeded permutation, cut into batches (the last,
    short one dropped when there is more than one)."""
    order = rng.permutation(n)
    bs = min(batch_size, n)
    cuts = [order[i : i + bs] for i in range(0, n - bs + 1, bs)]
    return cuts or [order]


def _label_similarity(y):
    """Jaccard index of the label sets of every pair of items (N x N)."""
    inter = y @ y.T
    union = y.sum(1, keepdim=True) + y.sum(1) - inter
    return inter / union.clamp(min=1)


def trained_network(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    dim: int,
    width: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    loss: str,
    margin: float,
    cls_weight: float,
    augment: bool,
    seed: int,
    threads: int,
) -> tuple:
    """Train :func:`network` on ``images`` (N x S x S float32 in [0, 1]) with
    multi-hot ``labels`` (N x L bool); returns ``(state_dict, final_loss)``.
    With ``cls_weight`` > 0 the state_dict also holds the multi-label head
    (``head.weight``, ``head.bias``: a linear layer from the embedding to the
    L label logits).

    The pair loss works on the L2-normalized embeddings of a batch, with label
    similarity the Jaccard index of two items' label sets:

    * ``"regression"``: soft-label pairwise regression, the mean squared
      difference between the cosine of each pair and its label similarity;
    * ``"ms"``: multi-similarity (positives share a label, negatives none).

    ``cls_weight`` > 0 adds ``cls_weight`` times the multi-label binary
    cross-entropy of the head (a linear layer on the embedding before its
    normalization).  AdamW, a linear warm-up and a cosine schedule.  Deterministic
    for a given ``seed`` and ``threads`` on a given CPU kind.
    """
    import torch
    import torch.nn.functional as F

    if loss not in ("regression", "ms"):
        raise ValueError(f"loss must be 'regression' or 'ms', not {loss!r}")
    with _pinned_torch(threads):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = network(dim, width, images.shape[-1]).to(memory_format=torch.channels_last)
        head = torch.nn.Linear(dim, labels.shape[1], bias=True)
        x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
        y_all = torch.from_numpy(labels.astype(np.float32))
        similarity = _label_similarity(y_all)
        params = list(net.parameters()) + (list(head.parameters()) if cls_weight > 0 else [])
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        steps_per_epoch = len(_batches(len(labels), batch_size, np.random.default_rng(0)))
        total = max(1, epochs * steps_per_epoch)
        warm = max(1, total // 20)

        def lr_factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, total - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        net.train()
        losses: list[float] = []
        for _ in range(epochs):
            for idx in _batches(len(labels), batch_size, rng):
                ix = torch.from_numpy(idx)
                x = x_all[ix]
                if augment:
                    with torch.no_grad():
                        x = _augmented(x, gen, shift=0.06, rotate=8.0, scale=0.08, jitter=0.15)
                raw = net(x.contiguous(memory_format=torch.channels_last))
                emb = F.normalize(raw, dim=1)
                target = similarity[ix][:, ix]
                if loss == "ms":
                    value = _ms_loss(emb, target, alpha=2.0, beta=50.0, base=0.5, margin=margin)
                else:
                    off = ~torch.eye(len(ix), dtype=torch.bool)
                    value = ((emb @ emb.T - target) ** 2)[off].mean()
                if cls_weight > 0:
                    value = value + cls_weight * F.binary_cross_entropy_with_logits(
                        head(raw), y_all[ix]
                    )
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
                losses.append(float(value.detach()))
            progress(
                len(losses) // steps_per_epoch, epochs, loss=np.mean(losses[-steps_per_epoch:])
            )
        tail = losses[-steps_per_epoch:] or [float("nan")]
        parts = {"": net} | ({"head.": head} if cls_weight > 0 else {})
        state = {
            prefix + k: v.detach().contiguous().clone()
            for prefix, module in parts.items()
            for k, v in module.state_dict().items()
        }
        return state, float(np.mean(tail))


def split_head(state_dict: dict) -> tuple[dict, dict]:
    """A state_dict as (the network's entries, the multi-label head's entries)."""
    head = {k[5:]: v for k, v in state_dict.items() if k.startswith("head.")}
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}, head


def onnx_bytes(
    state_dict: dict, *, dim: int, size: int, findings: bool = False, threads: int = 1
) -> bytes:
    """The network with ``state_dict`` exported to ONNX (batch axis dynamic),
    with the legacy TorchScript exporter: same weights, same bytes.

    ``findings=True`` exports the network with its head as findings vectors
    (:func:`findings_model`; the state_dict must hold ``head.*``), otherwise
    the embedding (a head in the state_dict is left out)."""
    import torch

    with _pinned_torch(threads):
        body, head_state = split_head(state_dict)
        net = network(dim, width_of(body), size)
        net.load_state_dict(body)
        if findings:
            if not head_state:
                raise ValueError("findings vectors need the network's head (head.weight)")
            head = torch.nn.Linear(dim, head_state["weight"].shape[0])
            head.load_state_dict(head_state)
            net = findings_model(net, head)
        net.eval()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning
            torch.onnx.export(
                net,
                (torch.zeros(1, 1, size, size),),
                buf,
                dynamo=False,
                input_names=["image"],
                output_names=["embedding"],
                dynamic_axes={"image": {0: "n"}, "embedding": {0: "n"}},
                opset_version=17,
                do_constant_folding=True,
            )
        return buf.getvalue()


def state_dict_from(data: bytes) -> dict:
    """A state_dict read from torch.save bytes (weights only, nothing executed)."""
    import torch

    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("the torch file holds no state_dict (a dict of tensors)")
    return obj
