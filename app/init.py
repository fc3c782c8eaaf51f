"""``flow init``: a commented flow.toml to start from."""

from __future__ import annotations

import json
from pathlib import Path

from flow.errors import ConfigError

__all__ = ["TEMPLATE", "write_init"]

TEMPLATE = """\
# flow project: what to index, where to keep it, and which indices to build.
# Paths are relative to this file.  Run `flow status` to see what is stale and
# `flow build index --target=all` to build.

[store]
# A folder (created if missing) or an fsspec URL such as "s3://bucket/prefix".
url = ".flow/store"
# options = { endpoint_url = "http://127.0.0.1:9000" }   # passed to fsspec

[build]
# sync | threads | local (a local Dask cluster) | tcp://host:port (existing scheduler)
scheduler = "local"
# workers = 2          # local cluster size (default: one per core)
# threads_below = 400  # "local": fewer stale item computations than this run in
#                      # threads of the flow process (no cluster start-up); 0: never
# item_timeout = 30    # seconds a file's decode may take (0: no limit), and the
# item_memory = "2 GiB" # memory it may allocate: past them the item fails, the build goes on
# [build.tls]          # for a tls:// scheduler (or flow build --tls-ca-file/-cert/-key)
# ca_file = "ca.pem"
# cert = "client.pem"
# key = "client.key"

# [cluster]                 # `flow build --cluster slurm`: workers as Slurm jobs
# partition = "cpu"
# cores = 1               # per job (one worker process with this many threads)
# memory = "4GB"
# walltime = "01:00:00"
# jobs = 4                # or adaptive_min = 0 / adaptive_max = 8
# job_extra = ["--qos=normal"]

[[sources]]
# A folder of DICOM / PNG / JPEG files, scanned recursively.
path = "{images}"
# include = ["*.dcm", "*.png", "*.jpg", "*.jpeg"]
# extensionless = true   # also take files without an extension (DICOM archives)
# An optional labels CSV: one row per image, joined on `file_column` (a path relative
# to the CSV or the source folder, or a bare file name), or on a DICOM identifier
# with join = "SOPInstanceUID" (or StudyInstanceUID, AccessionNumber).
{labels_line}
# labels_column = "finding_labels"   # labels joined by labels_separator ("|")
# split_column = "split"              # e.g. train / val

# [[sources]]             # a DICOMweb archive (QIDO-RS / WADO-RS), e.g. Orthanc
# name = "pacs"
# dicomweb = "http://pacs:8042/dicom-web"
# username = "flow"
# password_env = "PACS_PASSWORD"   # or token_env = "PACS_TOKEN"; ca_file = "ca.pem"

# [receive]               # `flow receive`: a DICOM Storage SCP (C-STORE)
# folder = "incoming"     # instances are stored here, then built as studies settle
# ae_title = "FLOW"
# port = 11112
# allowed = ["CT01"]      # calling AE titles accepted (default: any)
# settle = 2.0            # seconds without an instance before a study is built

# [ids]                   # item ids are keyed hashes of file names (no patient names
# scheme = "keyed"        # in the store); "path" keeps paths; the salt is kept in
# salt_file = ".flow/id-salt"   # the project folder, never in the store

[train]
# Items of these splits train the fit nodes (vocabulary, embedder, coder).
splits = ["train"]

# [database]
# splits = ["train"]    # which items go into the indices (default: every item)

[eval]
queries = ["val"]       # `flow eval`: these items query ...
database = ["train"]    # ... an index of these
k = 10

# Targets: each is one index.  kind = bovw | cnn | codes.  Sub-tables set the
# parameters of the target's nodes; `flow status` shows which steps a change
# makes stale.
[targets.cnn]
kind = "cnn"
# weights = "my_embedder.onnx"   # use your own network instead of training one
[targets.cnn.normalize]
size = 64
# [targets.cnn.embedder]
# epochs = 80            # training epochs (defaults: dim 64, width 32)
# batch_size = 64        # with only a few hundred training images, 16-32 gives the
#                        # findings head enough steps
# vectors = "findings"   # index the head's finding probabilities, ranked by inner
#                        # product (expected shared findings); "embedding": the
#                        # metric embedding, by cosine
# augment = false        # affine warp + intensity jitter while training

[targets.bovw]
kind = "bovw"
[targets.bovw.vocabulary]
words = 256

[targets.codes]
kind = "codes"          # binary codes from the cnn embedding, re-ranked by it
embedding = "cnn"
[targets.codes.coder]
bits = 64
"""


def write_init(
    folder: str | Path, images: str = "images", labels: str | None = None, force: bool = False
) -> Path:
    """Write the commented ``flow.toml`` into ``folder``; its path.  A
    :class:`ConfigError` if one exists and ``force`` is not given."""
    path = Path(folder) / "flow.toml"
    if path.exists() and not force:
        raise ConfigError(f"{path} exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    labels_line = f"labels = {json.dumps(labels)}" if labels else '# labels = "labels.csv"'
    text = TEMPLATE.replace("{images}", json.dumps(images)[1:-1]).replace(
        "{labels_line}", labels_line
    )
    path.write_text(text, encoding="utf-8")
    return path
