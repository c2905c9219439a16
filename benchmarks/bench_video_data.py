"""The video data loader's rate per decoder: clips/s of decode + augment, PyAV against decord, side by side.

Generated videos of realistic size (10 s at 320×240, 25 fps, moving texture) in H.264 (MP4) and MPEG-4
Part 2 (AVI, as UCF101 and HMDB51 ship), read as training clips: TSN sampling of 32 frames, the released
augmentation to 224², CLIP normalisation (``VideoDataset`` in train mode, one decoder thread: the rate of
one loader worker). Each call reads one clip of the next video; the files are in the page cache (written
just before), so disk speed is not part of it. Decode alone (the sampled frames as RGB arrays) is timed
as well, to tell the decoder's share from the augmentation's.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from prism_vfm.video.data import sampling  # noqa: E402
from prism_vfm.video.data.dataset import VideoDataset  # noqa: E402
from prism_vfm.video.data.decode import open_video  # noqa: E402
from prism_vfm.video.data.lists import VideoSample  # noqa: E402
from prism_vfm.video.data.synthetic import synthetic_frames, write_video  # noqa: E402

CODECS = {"h264": ".mp4", "mpeg4": ".avi"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--videos", type=int, default=4, help="videos per codec (default 4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="video length (default 10 s at 25 fps)")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip (default 32)")
    parser.add_argument("--decoders", default="pyav,decord", help="comma-separated (default pyav,decord)")
    args = parser.parse_args(argv)
    if harness.in_processes(args, argv):
        return
    device = harness.setup(args)
    width, height, size, scale = (320, 240, 224, 256) if not args.quick else (64, 48, 32, 36)
    seconds = args.seconds if not args.quick else 1.0
    frames = args.frames if not args.quick else 8
    decoders = [d for d in args.decoders.split(",") if d]
    if "decord" in decoders and importlib.util.find_spec("decord") is None:
        print("decord: not installed (pip install decord), measured PyAV only")
        decoders.remove("decord")
    harness.describe(args, device)
    print(
        f"videos: {args.videos} per codec, {seconds:g} s at {width}x{height}, 25 fps, {int(seconds * 25)} "
        f"frames; clips: {frames} frames (TSN), augmented to {size}² (shorter side {scale}); "
        "one decoder thread"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[harness.Case] = []
        for codec, ext in CODECS.items():
            samples = []
            for v in range(args.videos):
                pixels = synthetic_frames(int(seconds * 25), (height, width), label=v, noise_seed=v)
                write_video(Path(tmp) / f"{codec}_{v}{ext}", pixels, codec)
                samples.append(VideoSample(f"{codec}_{v}{ext}", 0))
            for decoder in decoders:
                data = VideoDataset(
                    tmp, samples, "train", num_frames=frames, size=size, scale_size=scale, decoder=decoder
                )
                counter = itertools.count()

                def clip(data: VideoDataset = data, counter: itertools.count = counter) -> None:
                    data[next(counter) % len(data)]

                def decode(data: VideoDataset = data, counter: itertools.count = counter) -> None:
                    i = next(counter)
                    video = open_video(Path(tmp) / data.samples[i % len(data)].path, data.decoder)
                    video.frames(
                        sampling.tsn_train_indices(video.num_frames, frames, sampling.sample_rng(0, 0, i))
                    )
                    video.close()

                cases.append(harness.Case(f"{codec} {decoder} decode+augment", clip))
                cases.append(harness.Case(f"{codec} {decoder} decode", decode))
        results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
    harness.report("one training clip (ms)", results)
    print()
    for name, res in results.items():
        print(f"rate {name}: {1 / res.median:.1f} clips/s (median {res.median * 1e3:.1f} ms)")
    if "decord" in decoders and "pyav" in decoders:
        for codec in CODECS:
            for stage in ("decode+augment", "decode"):
                harness.ratio(
                    f"{codec} {stage} decord / pyav time",
                    results[f"{codec} decord {stage}"],
                    results[f"{codec} pyav {stage}"],
                )
    harness.finish()


if __name__ == "__main__":
    main()
