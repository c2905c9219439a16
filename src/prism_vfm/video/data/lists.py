"""Which videos a split holds, and what their classes are called (SPEC §5).

The released form is a list file, one sample per line — ``path label`` or ``path num_frames label`` with
0-based labels — and a label CSV with header ``id,name``. The published split files of UCF101
(``ucfTrainTestlist/``), HMDB51 (``testTrainMulti_7030_splits/``), Kinetics-400 (the annotation CSVs) and
Something-Something v2 (the JSON files) are read into the same :class:`VideoSample` records. Every error
names the file and line and what was expected.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from prism_vfm.data.registry import get_video_dataset

MIN_TRAIN_FRAMES = 8
"""The release drops training videos whose list gives fewer frames (3-column lists only)."""


@dataclass(frozen=True)
class VideoSample:
    """One video of a split: its path relative to the data root, its class and (if listed) frame count."""

    path: str
    label: int
    num_frames: int | None = None


def _where(path: Path, line_no: int) -> str:
    return f"{path}, line {line_no}"


def read_label_csv(path: str | os.PathLike[str]) -> list[str]:
    """Class names by id from a CSV with header ``id,name`` (ids 0..C−1, each once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label CSV {path} does not exist")
    names: dict[int, str] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["id", "name"]:
            raise ValueError(f"{_where(path, 1)}: expected the header 'id,name', got {header!r}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2 or not row[0].strip().isdigit():
                raise ValueError(
                    f"{_where(path, line_no)}: expected 'id,name' with an integer id, got {row!r}"
                )
            cid = int(row[0])
            if cid in names:
                raise ValueError(f"{_where(path, line_no)}: class id {cid} appears twice")
            names[cid] = ",".join(row[1:]).strip()
    missing = sorted(set(range(len(names))) - set(names))
    if missing:
        raise ValueError(f"{path}: class ids must be 0..{len(names) - 1}; missing {missing[:10]}")
    return [names[i] for i in range(len(names))]


def read_video_list(
    path: str | os.PathLike[str],
    num_classes: int | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
    drop_short: bool = False,
) -> list[VideoSample]:
    """Samples of a released list file (``path label`` or ``path num_frames label``, 0-based labels).

    ``num_classes`` (the label CSV's length) bounds the labels; with ``root`` every listed video (file or
    frame folder) must exist under it. ``drop_short`` drops 3-column entries
    under :data:`MIN_TRAIN_FRAMES` frames, as the release does outside test mode; a listed frame count of
    zero is an error in any mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video list {path} does not exist")
    samples: list[VideoSample] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise ValueError(
                f"{_where(path, line_no)}: expected 'path label' or 'path num_frames label', got {line!r}"
            )
        try:
            label = int(fields[-1])
        except ValueError:
            raise ValueError(f"{_where(path, line_no)}: label {fields[-1]!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise ValueError(
                f"{_where(path, line_no)}: label {label} is outside the label CSV's classes ({bound})"
            )
        frames = None
        if len(fields) == 3:
            if not fields[1].isdigit():
                raise ValueError(f"{_where(path, line_no)}: frame count {fields[1]!r} is not an integer")
            frames = int(fields[1])
            if frames == 0:
                raise ValueError(f"{_where(path, line_no)}: frame count is 0 for {fields[0]}")
            if drop_short and frames < MIN_TRAIN_FRAMES:
                continue
        if root is not None and not (Path(root) / fields[0]).exists():
            raise FileNotFoundError(f"{_where(path, line_no)}: video {Path(root) / fields[0]} does not exist")
        samples.append(VideoSample(fields[0], label, frames))
    if not samples:
        raise ValueError(f"video list {path} holds no samples")
    return samples


def video_list_text(samples: list[VideoSample]) -> str:
    """Samples in the released list form (3 columns where every sample has a frame count)."""
    three = all(s.num_frames is not None for s in samples)
    lines = [f"{s.path} {s.num_frames} {s.label}" if three else f"{s.path} {s.label}" for s in samples]
    return "\n".join(lines) + "\n"


def write_video_list(path: str | os.PathLike[str], samples: list[VideoSample]) -> None:
    """Write samples in the released list form (:func:`video_list_text`)."""
    Path(path).write_text(video_list_text(samples), encoding="utf-8")


def label_csv_text(names: list[str]) -> str:
    """Class names as the released ``id,name`` CSV."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["id", "name"])
    writer.writerows(enumerate(names))
    return buffer.getvalue()


def write_label_csv(path: str | os.PathLike[str], names: list[str]) -> None:
    """Write class names as the released ``id,name`` CSV (:func:`label_csv_text`)."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        f.write(label_csv_text(names))


def _check_split(dataset: str, split: int, subset: str) -> None:
    info = get_video_dataset(dataset)
    if split not in info.splits:
        raise ValueError(f"{info.title} has splits {list(info.splits)}, got split {split}")
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")


def ucf101_split(
    split_dir: str | os.PathLike[str], split: int, subset: str
) -> tuple[list[VideoSample], list[str]]:
    """UCF101's published split ``split`` (1–3) from ``ucfTrainTestlist/``: samples and class names.

    ``classInd.txt`` numbers classes from 1 (``1 ApplyEyeMakeup``); ``trainlist0N.txt`` lines carry that
    number, ``testlist0N.txt`` lines only the path, whose folder is the class. Labels become 0-based.
    """
    _check_split("ucf101", split, subset)
    split_dir = Path(split_dir)
    ind = split_dir / "classInd.txt"
    if not ind.is_file():
        raise FileNotFoundError(f"UCF101 class index {ind} does not exist")
    names: list[str] = []
    for line_no, line in enumerate(ind.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[0] != str(len(names) + 1):
            raise ValueError(f"{_where(ind, line_no)}: expected '{len(names) + 1} ClassName', got {line!r}")
        names.append(fields[1])
    by_name = {n: i for i, n in enumerate(names)}
    lst = split_dir / f"{subset}list0{split}.txt"
    if not lst.is_file():
        raise FileNotFoundError(f"UCF101 split list {lst} does not exist")
    samples = []
    for line_no, line in enumerate(lst.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rel = line.split()[0]
        cls = rel.split("/")[0]
        if cls not in by_name:
            raise ValueError(f"{_where(lst, line_no)}: class folder {cls!r} is not in {ind}")
        samples.append(VideoSample(rel, by_name[cls]))
    return samples, names


def hmdb51_split(
    split_dir: str | os.PathLike[str], split: int, subset: str
) -> tuple[list[VideoSample], list[str]]:
    """HMDB51's published split ``split`` (1–3) from ``testTrainMulti_7030_splits/``.

    One file per class, ``<class>_test_split<N>.txt``, lines ``video.avi 1|2|0`` (train, test, unused);
    classes are numbered in sorted file-name order and videos are looked up as ``<class>/video.avi``.
    """
    _check_split("hmdb51", split, subset)
    split_dir = Path(split_dir)
    files = sorted(split_dir.glob(f"*_test_split{split}.txt"))
    if not files:
        raise FileNotFoundError(f"no HMDB51 split files *_test_split{split}.txt in {split_dir}")
    want = "1" if subset == "train" else "2"
    names, samples = [], []
    for label, file in enumerate(files):
        cls = file.name[: -len(f"_test_split{split}.txt")]
        names.append(cls)
        for line_no, line in enumerate(file.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ValueError(f"{_where(file, line_no)}: expected 'video.avi 0|1|2', got {line!r}")
            if fields[1] == want:
                samples.append(VideoSample(f"{cls}/{fields[0]}", label))
    return samples, names


def published_split(
    dataset: str, split_dir: str | os.PathLike[str], split: int, subset: str
) -> tuple[list[VideoSample], list[str]]:
    """Split ``split`` of ``dataset`` (a registry name with published split files: UCF101, HMDB51) read
    from its folder of split files: samples and class names."""
    info = get_video_dataset(dataset)
    readers = {"ucf101": ucf101_split, "hmdb51": hmdb51_split}
    if info.name not in readers:
        raise ValueError(
            f"{info.title} has no published split files to read (only {sorted(readers)}); give its split as "
            "a video list and a label CSV"
        )
    return readers[info.name](split_dir, split, subset)


def kinetics_annotations(csv_path: str | os.PathLike[str], class_names: list[str]) -> list[VideoSample]:
    """Kinetics samples from a published annotation CSV (``label,youtube_id,time_start,time_end,split``).

    Videos sit flat under the root as ``<youtube_id>_<start:06d>_<end:06d>.mp4``, the released naming.
    """
    csv_path = Path(csv_path)
    by_name = {n: i for i, n in enumerate(class_names)}
    samples = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            try:
                label = by_name[row["label"]]
                name = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
            except KeyError as e:
                raise ValueError(
                    f"{_where(csv_path, line_no)}: unknown class or missing column {e}"
                ) from None
            samples.append(VideoSample(name, label))
    return samples


def ssv2_annotations(
    json_path: str | os.PathLike[str], labels_json: str | os.PathLike[str]
) -> tuple[list[VideoSample], list[str]]:
    """Something-Something v2 samples from ``something-something-v2-<subset>.json`` and ``labels.json``.

    Class ids come from ``labels.json`` (``{"Approaching something ...": "0"}``); an entry's class is its
    ``template`` with the brackets removed; videos sit flat as ``<id>.webm``.
    """
    labels_json = Path(labels_json)
    ids = {k: int(v) for k, v in json.loads(labels_json.read_text()).items()}
    names = [""] * len(ids)
    for k, v in ids.items():
        names[v] = k
    samples = []
    for i, entry in enumerate(json.loads(Path(json_path).read_text())):
        cls = entry["template"].replace("[", "").replace("]", "")
        if cls not in ids:
            raise ValueError(f"{json_path}, entry {i}: template {cls!r} is not in {labels_json}")
        samples.append(VideoSample(f"{entry['id']}.webm", ids[cls]))
    return samples, names
