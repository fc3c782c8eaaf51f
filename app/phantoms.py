"""Synthetic chest-radiograph phantoms with findings, written as a labeled DICOM study folder.

``flow demo`` needs a small labeled archive it can build, query and evaluate
without any download.  This module makes one:

* :func:`phantom_image` draws one frontal chest radiograph-like image (uint16,
  12-bit, MONOCHROME2 sense: dense is bright).  The image is an additive
  "density" map -- body soft tissue thick in the middle, aerated lungs cut out
  of it (minus the heart silhouette), mediastinum, spine, posterior ribs,
  clavicles and a vessel tree fanning out of each hilum -- then a random
  similarity transform (position, scale, rotation), exposure gain/offset/ramp
  and quantum noise.  Findings change the anatomy the way they do on film:

  - ``Cardiomegaly``: the heart silhouette is 40-70 % wider (cardiothoracic
    ratio above ~0.5 instead of ~0.4);
  - ``Effusion``: the lower lung zone of one or both sides loses its air below
    a meniscus that rises laterally (blunted costophrenic angle);
  - ``Nodule``: a small round opacity somewhere in a lung;
  - ``Pneumothorax``: an apical/lateral rim of one lung that is darker and has
    no vessel markings, bounded by a thin pleural line;
  - ``Infiltration``: patchy, smoothed opacities in part of one or both lungs;
  - ``No Finding``: none of these.

  Lungs and ribs are implicit shapes (numpy inequalities on the pixel grid);
  everything else is ``skimage.draw.ellipse``/``line_aa``, ``skimage.transform.warp``
  and ``scipy.ndimage.gaussian_filter``.

* :func:`write_phantom_study` writes ``n`` such images as real CR/DX DICOM
  files (``images/P0001/S01/IM0001.dcm``) in a mix of transfer syntaxes
  (Explicit/Implicit VR Little Endian, Deflated, RLE, JPEG-LS and JPEG 2000
  lossless where an encoder is installed), ~15 % MONOCHROME1 (stored values
  inverted), rescale slope/intercept and VOI windows on some, and fake but
  realistic-looking identifying attributes.  It writes ``labels.csv``
  (``file,split,finding_labels``; split by patient).  Everything follows from
  ``seed``: UIDs come from ``generate_uid(entropy_srcs=...)``, dates are drawn,
  not read from the clock, so two writes give identical bytes.

* :func:`phantom_identifiers` lists the identifying strings present in a
  folder's DICOM files (for the PHI audit), :func:`write_bad_files` writes a
  few broken inputs for the "bad file reported, build continues" tests.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_encoder
from scipy.ndimage import binary_erosion, gaussian_filter
from skimage.draw import ellipse, line_aa
from skimage.transform import SimilarityTransform, warp

__all__ = [
    "FINDINGS",
    "phantom_identifiers",
    "phantom_image",
    "phantom_lesions",
    "write_bad_files",
    "write_phantom_study",
]

FINDINGS = ("Cardiomegaly", "Effusion", "Infiltration", "Nodule", "Pneumothorax")
NO_FINDING = "No Finding"
_MAX = 4095  # 12-bit
_IDENTIFIER_TAGS = ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate")
_ENTROPY = "flow-phantoms-v1"
_IMPLEMENTATION_UID = dcm_uid.generate_uid(entropy_srcs=[_ENTROPY, "implementation"])
_SURNAMES = ("DOE", "ROE", "MOE", "POE", "LOWE", "STONE", "MARSH", "FIELD", "BROOK", "HALE")
_GIVEN = {"F": ("JANE", "MARY", "ANNA", "LUCY", "ROSE"), "M": ("JOHN", "JAMES", "PETER", "PAUL")}
# fmt: off
# transfer syntax slots (Explicit VR Little Endian most) and the encoder plugin each uses
_TS_WEIGHTED = 2 * (
    [dcm_uid.ExplicitVRLittleEndian] * 10 + [dcm_uid.ImplicitVRLittleEndian, dcm_uid.RLELossless,
    dcm_uid.JPEGLSLossless, dcm_uid.JPEG2000Lossless, dcm_uid.DeflatedExplicitVRLittleEndian]
)
_ENCODER_PLUGIN = {dcm_uid.RLELossless: "pylibjpeg", dcm_uid.JPEGLSLossless: "pyjpegls",
                   dcm_uid.JPEG2000Lossless: "pylibjpeg"}
# normal-range anatomy, uniform between these bounds, in fractions of the image size
_ANATOMY = {
    "body_rx": (0.41, 0.47), "body_ry": (0.58, 0.68), "d_med": (0.055, 0.075),
    "d_lat": (0.31, 0.37), "apex": (0.12, 0.18), "base": (0.75, 0.82), "dome_h": (0.06, 0.11),
    "heart_y": (0.6, 0.65), "heart_x": (0.53, 0.56), "heart_rx": (0.125, 0.15),
    "heart_ry": (0.1, 0.12), "heart_rot": (-0.4, -0.15), "lung_air": (0.28, 0.36),
    "tissue": (0.5, 0.58), "rib_gap": (0.056, 0.066), "rib_width": (0.25, 0.34),
    "rib_curve": (2.2, 3.2),
}
# fmt: on


# --------------------------------------------------------------------------
# the image


def _lung_mask(d: np.ndarray, yy: np.ndarray, p: dict, shrink: float = 0.0, drop: float = 0.0):
    """One lung as an implicit shape; ``d`` is the distance from the midline on its side.

    Rounded apex, lateral wall widening to a sharp costophrenic angle, domed
    diaphragm, straight medial border.  ``shrink``/``drop`` pull the lateral
    wall in and the apex down (the collapsed lung of a pneumothorax).
    """
    d_med, d_lat, apex = p["d_med"], p["d_lat"] - shrink, p["apex"] + drop
    base, dome = p["base"], p["base"] - p["dome_h"]
    d_apex = d_med + 0.35 * (d_lat - d_med)
    t = (yy - apex) / (base - apex)
    tc = np.clip(t, 0.0, 1.0)
    lateral = d_apex + (d_lat - d_apex) * np.sqrt(np.sin(np.pi / 2 * tc))
    medial = d_med + (d_apex - d_med) * (1 - np.sqrt(np.clip(t / 0.12, 0.0, 1.0)))
    s = np.clip((d_lat - d) / (d_lat - d_med), 0.0, 1.0)
    diaphragm = base - (base - dome) * np.sin(0.75 * np.pi * s)
    return (t >= 0) & (d > medial) & (d < lateral) & (yy < diaphragm)


def _rib_mask(d: np.ndarray, yy: np.ndarray, p: dict) -> np.ndarray:
    """Posterior ribs of one side: bands along curves that rise off the spine, then fall."""
    curve = p["rib_curve"] * ((d - 0.08) ** 2 - 0.0064)
    phase = (yy - curve - p["apex"] + 0.03) / p["rib_gap"]
    cage = (d > 0.03) & (d < p["d_lat"] + 0.035)
    return cage & (phase > 0) & (phase < 10) & (phase % 1 < p["rib_width"])


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.standard_normal((size, size), dtype=np.float32)


def _mask(rr, cc, size: int) -> np.ndarray:
    out = np.zeros((size, size), bool)
    out[rr, cc] = True
    return out


def _vessels(rng: np.random.Generator, size: int, p: dict) -> np.ndarray:
    """Bronchovascular markings: tapering, bending branches out of each hilum."""
    segments, stack = [], []
    for side in (-1, 1):
        hy, hx = rng.uniform(0.4, 0.46), 0.5 + side * (p["d_med"] + 0.04)
        for ang in rng.uniform(-0.45, 0.55, 7) * np.pi:  # 0 = lateral, <0 up, >0 down
            stack.append((hy, hx, ang, rng.uniform(0.05, 0.1), rng.uniform(0.6, 1.0), side, 3))
    while stack:
        y, x, ang, step, weight, side, left = stack.pop()
        ang += rng.normal(0, 0.25)
        ey, ex = y + np.sin(ang) * step, x + side * np.cos(ang) * step
        rr, cc, val = line_aa(int(y * size), int(x * size), int(ey * size), int(ex * size))
        segments.append((rr, cc, val * weight))
        if left > 1:
            stack.append((ey, ex, ang, step, weight * 0.75, side, left - 1))
            if left == 3 and rng.random() < 0.6:
                turn = rng.choice([-0.5, 0.5])
                stack.append((ey, ex, ang + turn, step * 0.7, weight * 0.5, side, 2))
    rr, cc, val = (np.concatenate(parts) for parts in zip(*segments))
    ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
    out = np.zeros((size, size), np.float32)
    np.maximum.at(out, (rr[ok], cc[ok]), val[ok])
    return out


def phantom_image(
    findings: tuple[str, ...],
    *,
    size: int = 128,
    rng: np.random.Generator,
    masks: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """A ``size`` x ``size`` uint16 (0..4095) frontal chest radiograph-like image.

    ``findings`` is any subset of :data:`FINDINGS` (or ``("No Finding",)``);
    anatomy, finding placement, exposure and noise are drawn from ``rng``.
    Generators in the same state give the same anatomy, pose and noise
    whatever the findings, so ``phantom_image((f,), rng=g1) - phantom_image((),
    rng=g2)`` (``g1``, ``g2`` seeded alike) shows finding ``f`` alone.
    """
    unknown = set(findings) - set(FINDINGS) - {NO_FINDING}
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; known: {FINDINGS}")
    fs = set(findings)
    # findings draw from their own stream: the same ``rng`` state gives the same
    # patient, pose and noise with or without them (a counterfactual pair)
    rng, frng = rng.spawn(2)
    p = {k: rng.uniform(lo, hi) for k, (lo, hi) in _ANATOMY.items()}
    n = size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    dist = {s: s * (xx - 0.5) for s in (-1, 1)}  # distance from the midline, per side

    # body soft tissue (squarish superellipse: shoulders), thicker in the middle, neck
    r2 = np.abs((xx - 0.5) / p["body_rx"]) ** 3 + ((yy - 0.6) / p["body_ry"]) ** 2
    density = 0.05 + p["tissue"] * np.clip(1 - r2, 0, 1) ** 0.3
    neck = ((xx - 0.5) / 0.1) ** 2 + ((yy + 0.02) / 0.14) ** 2 < 1
    density[neck] = np.maximum(density[neck], 0.05 + 0.8 * p["tissue"])

    # heart silhouette: left ventricle (image right) and right atrium (image left)
    hrx, hry, hx = p["heart_rx"], p["heart_ry"], p["heart_x"]
    if "Cardiomegaly" in fs:
        hrx *= frng.uniform(1.4, 1.7)
        hry *= frng.uniform(1.15, 1.3)
        hx += frng.uniform(0.01, 0.03)
    hy = p["heart_y"]
    heart = _mask(*ellipse(hy * n, hx * n, hry * n, hrx * n, (n, n), p["heart_rot"]), n)
    heart |= _mask(
        *ellipse((hy - 0.01) * n, (hx - 0.7 * hrx) * n, 0.8 * hry * n, 0.45 * hrx * n, (n, n)), n
    )

    # lungs: air fraction per pixel (1 = normally aerated) and vessel-marking weight
    lungs = {s: _lung_mask(dist[s], yy, p) & ~heart for s in (-1, 1)}
    lung = lungs[-1] | lungs[1]
    air = lung.astype(np.float32)
    marks = lung.astype(np.float32)
    extra = np.zeros((n, n), np.float32)  # added opacities (findings, pleural line)
    where: dict[str, np.ndarray] = {}  # finding -> its mask before the pose transform
    if "Cardiomegaly" in fs:
        where["Cardiomegaly"] = heart.copy()

    if "Effusion" in fs:
        sides = ((-1,), (1,), (-1, 1))[frng.choice(3, p=[0.4, 0.3, 0.3])]
        for s in sides:
            level = p["base"] - frng.uniform(0.2, 0.4) * (p["base"] - p["apex"])
            lateral = np.clip(dist[s] - p["d_med"], 0, None) / (p["d_lat"] - p["d_med"])
            fluid = lungs[s] & (yy > level - frng.uniform(0.04, 0.1) * lateral**2)
            fluid = gaussian_filter(fluid.astype(np.float32), 0.008 * n)
            where["Effusion"] = where.get("Effusion", np.zeros((n, n), bool)) | (fluid > 0.5)
            air *= 1 - frng.uniform(0.8, 0.95) * fluid
            marks *= 1 - fluid
    if "Pneumothorax" in fs:
        s = int(frng.choice([-1, 1]))
        shrink, drop = frng.uniform(0.06, 0.12), frng.uniform(0.05, 0.12)
        collapsed = _lung_mask(dist[s] + 0.3 * shrink, yy, p, shrink, drop)
        rim = lungs[s] & ~collapsed & (yy < p["base"] - 0.1)
        where["Pneumothorax"] = rim.copy()
        air[rim] = frng.uniform(1.25, 1.5)
        marks[rim] = 0.0
        line = collapsed & ~binary_erosion(collapsed) & lungs[s] & (yy < p["base"] - 0.1)
        extra += 0.08 * line
    if "Infiltration" in fs:
        side_mask = (lungs[-1], lungs[1], lung)[frng.choice(3, p=[0.4, 0.4, 0.2])]
        top = frng.uniform(0.25, 0.5)
        zone = side_mask & (yy > top) & (yy < top + frng.uniform(0.3, 0.45))
        field = gaussian_filter(_noise(frng, n), 0.02 * n)
        if zone.any():
            thr = np.quantile(field[zone], 0.5)
            patches = np.where(zone, np.clip(field - thr, 0, None), 0.0)
            patches = np.sqrt(patches / (patches.max() + 1e-9))
            where["Infiltration"] = patches > 0.2
            extra += frng.uniform(0.2, 0.3) * gaussian_filter(patches, 0.008 * n)
    if "Nodule" in fs:
        cand = np.flatnonzero((air > 0.95) & (marks > 0.5))
        if cand.size:
            cy, cx = np.unravel_index(cand[frng.integers(cand.size)], (n, n))
            r = frng.uniform(0.035, 0.06) * n
            nod = _mask(*ellipse(cy, cx, r, r * frng.uniform(0.85, 1.15), (n, n)), n)
            where["Nodule"] = nod
            extra += frng.uniform(0.25, 0.35) * gaussian_filter(nod.astype(np.float32), 0.2 * r)

    vessels = _vessels(rng, n, p)
    texture = gaussian_filter(_noise(rng, n), 0.01 * n + 0.3)
    density -= p["lung_air"] * air  # edges soften in the final blur
    density += marks * (0.16 * vessels + 0.012 * texture / texture.std())
    density += 0.04 * heart

    # mediastinum, aortic knob, spine with vertebral bodies, ribs, clavicles
    density += 0.08 * _mask(*ellipse(0.33 * n, 0.5 * n, 0.25 * n, p["d_med"] * n, (n, n)), n)
    density += 0.05 * _mask(*ellipse(0.3 * n, 0.555 * n, 0.035 * n, 0.035 * n, (n, n)), n)
    spine = (np.abs(xx - 0.5) < 0.032) & (yy > 0.02)
    density += spine * (0.035 + 0.025 * (np.cos(2 * np.pi * yy / 0.045) > -0.6))
    ribs = _rib_mask(dist[-1], yy, p) | _rib_mask(dist[1], yy, p)
    density += rng.uniform(0.04, 0.06) * ribs
    for s in (-1, 1):
        rr, cc = ellipse(0.13 * n, (0.5 + s * 0.17) * n, 0.013 * n, 0.16 * n, (n, n), s * 0.18)
        density[rr, cc] += 0.07
    density += extra
    density = gaussian_filter(density, 0.006 * n + 0.3)

    # pose: similarity transform about the centre
    c = n / 2
    shift = rng.uniform(-0.03, 0.03, 2) * n
    tform = (
        SimilarityTransform(translation=(-c, -c))
        + SimilarityTransform(scale=rng.uniform(0.94, 1.06), rotation=rng.uniform(-0.05, 0.05))
        + SimilarityTransform(translation=(c + shift[0], c + shift[1]))
    )
    density = warp(density, tform.inverse, order=1, mode="constant", cval=0.05)
    if masks is not None:
        for f, m in where.items():
            moved = warp(m.astype(np.float32), tform.inverse, order=0, mode="constant", cval=0.0)
            masks[f] = moved > 0.5

    # exposure and noise
    ramp = rng.uniform(-0.04, 0.04) * (xx - 0.5) + rng.uniform(-0.04, 0.04) * (yy - 0.5)
    density = rng.uniform(-0.03, 0.05) + rng.uniform(0.85, 1.1) * density + ramp
    density += rng.uniform(0.008, 0.016) * _noise(rng, n)
    density += 0.006 * texture / texture.std()
    return np.clip(np.rint(density * _MAX), 0, _MAX).astype(np.uint16)


# --------------------------------------------------------------------------
# the study folder

# attributes every phantom file carries, then those a DX (for presentation) file adds
# fmt: off
_COMMON = {
    "SpecificCharacterSet": "ISO_IR 100", "ImageType": ["ORIGINAL", "PRIMARY"],
    "Manufacturer": "FLOW PHANTOM WORKS", "InstitutionName": "PHANTOM GENERAL HOSPITAL",
    "ReferringPhysicianName": "", "StudyDescription": "XR CHEST 1 VIEW",
    "BodyPartExamined": "CHEST", "SeriesNumber": 1, "PatientOrientation": ["L", "F"],
    "SamplesPerPixel": 1, "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11,
    "PixelRepresentation": 0,
}
_DX = {
    "PresentationIntentType": "FOR PRESENTATION", "DetectorType": "SCINTILLATOR",
    "ImageLaterality": "U", "PixelIntensityRelationship": "LOG",
    "LossyImageCompression": "00", "BurnedInAnnotation": "NO",
}
# fmt: on
_FROM_PLAN = (*_IDENTIFIER_TAGS, "PatientSex", "PatientAge", "StudyDate", "StudyTime", "StudyID")


def _transfer_syntaxes() -> list[tuple[str, str | None]]:
    """(transfer syntax, encoding plugin or None for native) slots this installation can write."""
    out = []
    for ts in _TS_WEIGHTED:
        plugin = None
        if ts in _ENCODER_PLUGIN:
            enc = get_encoder(ts)
            if not enc.is_available:
                continue
            plugin = _ENCODER_PLUGIN[ts] if _ENCODER_PLUGIN[ts] in enc.available_plugins else ""
        out.append((ts, plugin))
    return out


def _finding_sets(n: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """~40 % "No Finding"; every finding equally often as a primary, some co-occurring."""
    n_normal = round(0.4 * n)
    order = rng.permutation(len(FINDINGS))
    sets: list[tuple[str, ...]] = [(NO_FINDING,)] * n_normal
    for i in range(n - n_normal):
        chosen = {FINDINGS[order[i % len(FINDINGS)]]}
        for p_more in (0.3, 0.08):
            if rng.random() < p_more:
                chosen.add(FINDINGS[rng.integers(len(FINDINGS))])
        sets.append(tuple(sorted(chosen)))
    return [sets[i] for i in rng.permutation(n)]


def _person(rng: np.random.Generator, patient: int, patient_id: int) -> dict:
    sex = "F" if rng.random() < 0.5 else "M"
    first = _dt.date(2018, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 4 * 365)))
    age = int(rng.integers(25, 90))
    birth = _dt.date(first.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    given = _GIVEN[sex][rng.integers(len(_GIVEN[sex]))]
    return {
        "PatientName": f"{_SURNAMES[rng.integers(len(_SURNAMES))]}^{given}^{patient:04d}",
        "PatientID": f"PHX{patient_id}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": sex,
        "first": first,
        "birth": birth,
    }


def _plan(n: int, seed: int, val_fraction: float) -> list[dict]:
    """Who, when and how for each of the ``n`` files: patients, studies, encodings, splits."""
    rng = np.random.default_rng([seed, 1])
    findings = _finding_sets(n, rng)
    slots = _transfer_syntaxes()
    kinds = list(dict.fromkeys(slots))  # every writable kind at least once, then the mix
    syntaxes = [(kinds + slots * (n // len(slots) + 1))[i] for i in rng.permutation(n)]
    mono1 = set(rng.permutation(n)[: round(0.15 * n) if n >= 4 else 0].tolist())
    ids = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    items: list[dict] = []
    patient = 0
    while len(items) < n:
        patient += 1
        person = _person(rng, patient, ids[patient - 1])
        date = person["first"]
        for study in range(1, int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])) + 1):
            date += _dt.timedelta(days=int(rng.integers(0, 400)))
            hms = rng.integers([7, 0, 0], [20, 60, 60])
            when = {
                "StudyDate": date.strftime("%Y%m%d"),
                "StudyTime": "".join(f"{v:02d}" for v in hms),
                "AccessionNumber": f"RX{date.year % 100:02d}{rng.integers(10**6):06d}",
                "PatientAge": f"{date.year - person['birth'].year:03d}Y",
                "StudyID": str(study),
            }
            for image in range(1, int(rng.choice([1, 2], p=[0.9, 0.1])) + 1):
                i = len(items)
                if i == n:
                    break
                items.append(
                    {
                        **person,
                        **when,
                        "file": f"images/P{patient:04d}/S{study:02d}/IM{image:04d}.dcm",
                        "patient": patient,
                        "study": study,
                        "image": image,
                        "findings": findings[i],
                        "ts": syntaxes[i][0],
                        "plugin": syntaxes[i][1],
                        "mono1": i in mono1,
                        "modality": "DX" if rng.random() < 0.25 else "CR",
                        "view": "AP" if rng.random() < 0.25 else "PA",
                        "rescale": int(rng.choice(3, p=[0.6, 0.2, 0.2])),  # none/identity/(2,-500)
                        "windows": int(rng.choice(3, p=[0.5, 0.35, 0.15])),
                    }
                )
    # split by patient, so that no patient is on both sides
    per_patient = np.bincount([it["patient"] for it in items])
    val: set[int] = set()
    for p in rng.permutation(patient) + 1:
        if sum(per_patient[v] for v in val) >= val_fraction * n or len(val) == patient - 1:
            break
        val.add(int(p))
    for it in items:
        it["split"] = "val" if it["patient"] in val else "train"
    return items


def _uid(seed: int, *parts: object) -> str:
    return dcm_uid.generate_uid(entropy_srcs=[_ENTROPY, str(seed), *map(str, parts)])


def _file_meta(sop_class: str, sop_instance: str, ts: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FLOW_PHANTOM_1"
    return meta


def _dataset(it: dict, image: np.ndarray, seed: int) -> Dataset:
    """A CR or DX image dataset for one planned file; ``image`` is the MONOCHROME2 rendering."""
    dx = it["modality"] == "DX"
    rescale = max(it["rescale"], 1) if dx else it["rescale"]  # DX requires the modality LUT
    slope, intercept = ((1.0, 0.0), (1.0, 0.0), (2.0, -500.0))[rescale]
    out = _MAX - image.astype(np.int64) if it["mono1"] else image.astype(np.int64)
    stored = np.rint((out - intercept) / slope).astype(np.uint16)
    out = stored * slope + intercept  # what the modality LUT gives back
    sop_class = (
        dcm_uid.DigitalXRayImageStorageForPresentation
        if dx
        else dcm_uid.ComputedRadiographyImageStorage
    )
    sop = _uid(seed, "sop", it["file"])
    ts = (
        it["ts"] if it["plugin"] is None else dcm_uid.ExplicitVRLittleEndian
    )  # compress() switches it
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop, ts)
    for tag, value in (_COMMON | (_DX if dx else {})).items():
        setattr(ds, tag, value)
    for tag in _FROM_PLAN:
        setattr(ds, tag, it[tag])
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID = _uid(seed, "study", it["patient"], it["study"])
    ds.SeriesInstanceUID = _uid(seed, "series", it["patient"], it["study"])
    ds.SeriesDate = ds.ContentDate = it["StudyDate"]
    ds.SeriesTime = ds.ContentTime = it["StudyTime"]
    ds.Modality, ds.ViewPosition, ds.InstanceNumber = it["modality"], it["view"], it["image"]
    ds.SeriesDescription = f"CHEST {it['view']}"
    ds.KVP = "120" if it["view"] == "PA" else "90"
    ds.Rows, ds.Columns = image.shape
    ds.ImagerPixelSpacing = [f"{350 / image.shape[0]:.6g}", f"{350 / image.shape[1]:.6g}"]
    ds.PhotometricInterpretation = "MONOCHROME1" if it["mono1"] else "MONOCHROME2"
    if dx:  # for MONOCHROME2, higher values mean less X-ray intensity (denser)
        ds.PixelIntensityRelationshipSign = 1 if it["mono1"] else -1
        ds.PresentationLUTShape = "INVERSE" if it["mono1"] else "IDENTITY"
    if rescale:
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:g}", f"{slope:g}", "US"
    windows = max(it["windows"], 1) if dx else it["windows"]  # DX requires a VOI
    if windows:
        lo, hi = np.percentile(out, [1, 99])
        lung = 0.4 * lo + 0.6 * hi if it["mono1"] else 0.6 * lo + 0.4 * hi
        ds.WindowCenter = [str(round((lo + hi) / 2)), str(round(lung))][:windows]
        ds.WindowWidth = [str(round(1.1 * (hi - lo))), str(round(0.6 * (hi - lo)))][:windows]
        ds.WindowCenterWidthExplanation = ["NORMAL", "LUNG"][:windows]
    if it["plugin"] is None:
        ds.PixelData = stored.astype("<u2").tobytes()
        ds["PixelData"].VR = "OW"
    else:
        ds.compress(it["ts"], stored, encoding_plugin=it["plugin"], generate_instance_uid=False)
    return ds


def write_phantom_study(
    folder: str | Path, *, n: int = 160, size: int = 128, seed: int = 0, val_fraction: float = 0.25
) -> Path:
    """Write ``n`` phantom DICOM files under ``folder/images/`` and ``folder/labels.csv``.

    Returns the path of ``labels.csv`` (``file,split,finding_labels``; ``file``
    relative to ``folder``; labels joined by ``|``).  The split is by patient;
    with two or more patients and ``0 < val_fraction``, both splits are non-empty.
    Same arguments, same bytes.
    """
    if n < 1 or size < 32 or not 0 <= val_fraction <= 1:
        raise ValueError(
            f"need n >= 1, size >= 32, 0 <= val_fraction <= 1 (got {n}, {size}, {val_fraction})"
        )
    folder = Path(folder)
    rows = []
    for i, it in enumerate(_plan(n, seed, val_fraction)):
        rng = np.random.default_rng([seed, 2, i])
        image = phantom_image(it["findings"], size=size, rng=rng)
        path = folder / it["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        _dataset(it, image, seed).save_as(path, enforce_file_format=True)
        rows.append((it["file"], it["split"], "|".join(it["findings"])))
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("file", "split", "finding_labels"))
        writer.writerows(sorted(rows))
    return labels


def phantom_lesions(
    *, n: int = 160, size: int = 128, seed: int = 0, val_fraction: float = 0.25
) -> dict[str, dict[str, np.ndarray]]:
    """Where the findings are in the files :func:`write_phantom_study` writes with the
    same arguments: file (as in ``labels.csv``) -> finding -> bool mask in the
    file's pixels.  The images are drawn again (nothing is read)."""
    out = {}
    for i, it in enumerate(_plan(n, seed, val_fraction)):
        masks: dict[str, np.ndarray] = {}
        rng = np.random.default_rng([seed, 2, i])
        phantom_image(it["findings"], size=size, rng=rng, masks=masks)
        out[it["file"]] = masks
    return out


def phantom_identifiers(folder: str | Path) -> dict[str, list[str]]:
    """PatientName, PatientID, AccessionNumber, PatientBirthDate values in ``folder``'s DICOMs.

    Read back from every ``*.dcm`` below ``folder`` whose header parses (empty
    values left out), so it is the ground truth a PHI audit can search for.
    """
    found: dict[str, set[str]] = {tag: set() for tag in _IDENTIFIER_TAGS}
    for path in sorted(Path(folder).rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue
        for tag in _IDENTIFIER_TAGS:
            if value := str(ds.get(tag, "") or ""):
                found[tag].add(value)
    return {tag: sorted(values) for tag, values in found.items()}


def write_bad_files(folder: str | Path) -> list[Path]:
    """Write broken inputs into ``folder`` and return their paths.

    ``truncated.dcm`` (a phantom CR cut inside its pixel data), ``not_dicom.dcm``
    (plain text), ``report_sr.dcm`` (a valid Basic Text SR: no pixel data) and
    ``empty.png`` (zero bytes).  Their fake patient is ``ROE^BROKEN^9999``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    it = _plan(1, 999, 0.0)[0]
    it |= {"ts": dcm_uid.ExplicitVRLittleEndian, "plugin": None, "mono1": False, "modality": "CR"}
    it["PatientName"] = "ROE^BROKEN^9999"
    image = phantom_image((NO_FINDING,), size=64, rng=np.random.default_rng([999, 2, 0]))
    buffer = io.BytesIO()
    _dataset(it, image, 999).save_as(buffer, enforce_file_format=True)
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(buffer.getvalue()[: -image.nbytes // 2])

    text = folder / "not_dicom.dcm"
    text.write_text("This is not a DICOM file, whatever its name says.\n")

    sr = Dataset()
    sr.file_meta = _file_meta(
        dcm_uid.BasicTextSRStorage, _uid(999, "sr"), dcm_uid.ExplicitVRLittleEndian
    )
    sr.SOPClassUID, sr.SOPInstanceUID = (
        dcm_uid.BasicTextSRStorage,
        sr.file_meta.MediaStorageSOPInstanceUID,
    )
    for tag in _FROM_PLAN:
        setattr(sr, tag, it[tag])
    sr.StudyInstanceUID = _uid(999, "study", 1, 1)
    sr.SeriesInstanceUID = _uid(999, "sr-series")
    sr.Modality, sr.SeriesNumber, sr.InstanceNumber = "SR", 2, 1
    sr.ValueType, sr.ContinuityOfContent = "CONTAINER", "SEPARATE"
    sr.CompletionFlag, sr.VerificationFlag = "COMPLETE", "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "18748-4", "LN"
    title.CodeMeaning = "Diagnostic Imaging Report"
    text_item = Dataset()
    text_item.RelationshipType, text_item.ValueType = "CONTAINS", "TEXT"
    text_item.ConceptNameCodeSequence = [title]
    text_item.TextValue = "No acute cardiopulmonary abnormality."
    sr.ConceptNameCodeSequence, sr.ContentSequence = [title], [text_item]
    report = folder / "report_sr.dcm"
    sr.save_as(report, enforce_file_format=True)

    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return [truncated, text, report, empty]
