"""What checking a video for a cut costs: the lung clips of ../shared/data decoded to RGB arrays
by `data.readers.read_video` (frame threads, packets checked for the demuxer's corrupt flag and
the count against the header), by the loop it replaced (`container.decode` with frame threads,
no checks), and by the same loop on one thread (which would raise the decoder's errors itself),
alternating, in one run.

    .venv/bin/python benchmarks/video_decode.py [--clips 12] [--rounds 5]

Prints frames per second of each, its wall time relative to `read_video`'s, and the CPU time
of all threads per frame.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import av

from sonodistill.data.readers import read_video

CLIPS = Path(__file__).resolve().parents[1].parent / "shared/data/corpus/covid_blues/lus_videos"


def unchecked(path: Path, thread_type: str | None) -> int:
    """The reader's loop before the checks: `container.decode`, no corrupt flag, no count."""
    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if thread_type:
            stream.thread_type = thread_type
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


WAYS = {
    "read_video (frame threads, checked)": lambda p: sum(1 for _ in read_video(p)),
    "container.decode, frame threads (before)": lambda p: unchecked(p, "AUTO"),
    "container.decode, one thread": lambda p: unchecked(p, None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    clips = sorted(CLIPS.glob("*.mp4"))[: args.clips]
    ways = list(WAYS)
    wall = {way: [0.0] * args.rounds for way in ways}
    cpu = {way: [0.0] * args.rounds for way in ways}
    frames = dict.fromkeys(ways, 0)
    for r in range(args.rounds):
        for k, clip in enumerate(clips):  # clip by clip, the order rotating: drifts of a
            for way in ways[k % 3 :] + ways[: k % 3]:  # shared machine hit all three alike
                t0, c0 = time.perf_counter(), time.process_time()  # CPU of all threads
                n = WAYS[way](clip)
                wall[way][r] += time.perf_counter() - t0
                cpu[way][r] += time.process_time() - c0
                frames[way] += n if r == 0 else 0
    assert len(set(frames.values())) == 1, frames
    n = frames[ways[0]]
    base = statistics.median(wall[ways[0]])
    print(f"{len(clips)} clips, {n} frames, {args.rounds} rounds (medians over rounds)")
    print("| decoding | frames/s | wall vs read_video | CPU ms / frame |\n|---|---:|---:|---:|")
    for way in ways:
        w, c = statistics.median(wall[way]), statistics.median(cpu[way])
        print(f"| {way} | {n / w:.0f} | {w / base:.2f} | {1000 * c / n:.2f} |")


if __name__ == "__main__":
    main()
