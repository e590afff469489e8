"""Structure-from-Motion steps of run_pipeline.py, on pycolmap.

Feature extraction, matching (sequential video pairs plus offline loop closure), mapping,
model choice, camera-path checks and undistortion into the trainer's layout.
"""

from __future__ import annotations

import itertools
import math
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from pipeline import colmap_log
from pipeline.scene import scene_object

ProgressFn = Callable[[int, int | None], None]

POLL_SECONDS = 0.5
# Matching reports progress once per block of pairs (COLMAP's unit): blocks of a tenth of the
# pairs, but at least as many pairs as frames (COLMAP caches the descriptors of a block's worth
# of frames) and at most MAX_MATCH_BLOCK.
PROGRESS_STEPS = 10
MAX_MATCH_BLOCK = 300
# Frames at or below this many pixels are upsampled for SIFT (first octave -1): cheap for small
# frames, and without it 640×480 video yields too few features.
UPSAMPLE_MAX_PIXELS = 500_000
MODEL_FILES = ("cameras.bin", "images.bin", "points3D.bin")


@dataclass
class SfmOptions:
    """Settings of the camera-tracking stages."""

    matcher: str = "sequential"
    mapper: str = "incremental"
    max_image_size: int = 1280
    max_features: int = 4096
    first_octave: int | None = None  # None: chosen from the frame size
    num_threads: int = -1
    camera_model: str = "SIMPLE_RADIAL"
    overlap: int = 5
    loop_closure: bool = True
    seed: int = 0


def configure_logging(verbose: bool) -> None:
    """Send COLMAP's log to stderr only (no glog files in the temp folder), warnings and up
    unless `verbose`."""
    pycolmap.logging.logtostderr = True
    pycolmap.logging.stderrthreshold = 0
    pycolmap.logging.minloglevel = 0 if verbose else 1
    pycolmap.logging.verbose_level = 0


def run_polled(
    work: Callable[[], Any], poll: Callable[[], int], total: int, progress: ProgressFn
) -> Any:
    """Run a long pycolmap call in a thread (it releases the GIL) while reporting
    `poll()` of `total` as progress; `poll` must not touch what the call is writing through
    SQLite (counting files is fine)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    progress(0, total)
    thread = threading.Thread(target=target, name="pycolmap", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_SECONDS)
        progress(min(poll(), total), total)
    if "error" in result:
        raise result["error"]
    progress(total, total)
    return result.get("value")


def first_octave_for(width: int, height: int, opts: SfmOptions) -> int:
    """SIFT first octave: upsample small frames, not large ones (4× the work)."""
    if opts.first_octave is not None:
        return opts.first_octave
    scale = 1.0
    if opts.max_image_size > 0:
        scale = min(1.0, opts.max_image_size / max(width, height))
    return -1 if width * height * scale * scale <= UPSAMPLE_MAX_PIXELS else 0


def extract_features(
    db: Path,
    image_dir: Path,
    names: list[str],
    size: tuple[int, int],
    opts: SfmOptions,
    progress: ProgressFn,
    camera_id: int | None = None,
) -> int:
    """SIFT features of every frame, all frames sharing one camera: a new one, or `camera_id`
    (frames of a source added in a second call). Returns the camera's id."""
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = opts.camera_model
    if camera_id is not None:
        reader.existing_camera_id = camera_id
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = opts.num_threads
    extraction.max_image_size = opts.max_image_size
    extraction.sift.max_num_features = opts.max_features
    extraction.sift.first_octave = first_octave_for(*size, opts)
    # No import_images pass first: it decodes every frame only to read its size (86 frames of
    # 1280x720, 1.3 s); extraction adds each frame with the call's one camera as it reads it.
    # One call for every frame (a call ends with cores idle while its last frames finish: 58
    # synthetic 960x540 frames on 2 cores, one call 10.1 s, chunks of 16 10.9 s); progress
    # comes from COLMAP's log, one step per frame.
    with colmap_log.progress_from_log() as log:
        run_polled(
            lambda: pycolmap.extract_features(
                db,
                image_dir,
                image_names=names,
                camera_mode=pycolmap.CameraMode.SINGLE,
                reader_options=reader,
                extraction_options=extraction,
            ),
            log.count,
            len(names),
            progress,
        )
    database = pycolmap.Database.open(db)
    try:
        return int(database.read_image_with_name(names[0]).camera_id)
    finally:
        database.close()


def sequential_pairs(n: int, overlap: int) -> set[tuple[int, int]]:
    """Pairs of frame positions: every neighbour up to `overlap` apart, plus those 2^k apart
    beyond (the union of COLMAP's linear and quadratic sequential pairing)."""
    pairs = set()
    for i in range(n):
        for d in range(1, overlap + 1):
            if i + d < n:
                pairs.add((i, i + d))
        d = 2 ** (overlap.bit_length())
        while i + d < n and d > overlap:
            pairs.add((i, i + d))
            d *= 2
    return pairs


def loop_pairs(
    thumbs: np.ndarray, overlap: int, per_frame: int = 2, min_similarity: float = 0.6
) -> set[tuple[int, int]]:
    """Offline loop-closure candidates: frames far apart in time whose thumbnails look alike
    (normalised cross-correlation); matching verifies them."""
    n = len(thumbs)
    if n < 2 * overlap + 2:
        return set()
    flat = thumbs.reshape(n, -1).astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6
    sim = flat @ flat.T
    idx = np.arange(n)
    sim[np.abs(idx[:, None] - idx[None, :]) <= 2 * overlap] = -1
    pairs = set()
    for i in range(n):
        for j in np.argsort(-sim[i])[:per_frame]:
            if sim[i, j] >= min_similarity:
                pairs.add((min(i, int(j)), max(i, int(j))))
    return pairs


def all_pairs(n: int) -> set[tuple[int, int]]:
    """Every pair of n frames (exhaustive matching)."""
    return {(i, j) for i in range(n) for j in range(i + 1, n)}


# Pairs matched between two sources of a capture: every pair while there are at most this many
# per frame of the two sources on average, else an even spread of that many (every frame of
# each source still meets frames all along the other; one verified pair in a few is enough
# to join two sources into one model).
CROSS_PAIRS_PER_FRAME = 6
# A photo set is matched exhaustively up to this many pairs (about 32 photos); a larger one
# sequentially in name order (how cameras number their photos), plus an even spread and the
# pairs whose thumbnails look alike. Pairs that fail verification cost the most (RANSAC runs
# to its limit): measured 6 pairs/s for the 136 pairs of 17 office photos on 2 loaded cores.
EXHAUSTIVE_PHOTO_PAIRS = 500


@dataclass
class SourceSpan:
    """Where one source's frames sit in a capture's list of frames."""

    start: int
    count: int
    ordered: bool  # a video's frames (in time order), not a set of photos
    thumbs: np.ndarray | None = None  # for loop closure within a video


def capture_pairs(
    spans: list[SourceSpan], overlap: int, loop_closure: bool
) -> set[tuple[int, int]]:
    """Pairs of frame positions for a capture with several sources: sequential (and loop
    closure) within each video, every pair within each photo set, and between any two
    sources every pair or an even spread of CROSS_PAIRS_PER_FRAME per frame (no retrieval
    index: the spread alone meets every part of both sources)."""
    pairs: set[tuple[int, int]] = set()
    for span in spans:
        if span.ordered:
            local = sequential_pairs(span.count, overlap)
            if loop_closure and span.thumbs is not None:
                local |= loop_pairs(span.thumbs, overlap)
        elif span.count * (span.count - 1) // 2 <= EXHAUSTIVE_PHOTO_PAIRS:
            local = all_pairs(span.count)
        else:  # photos are usually named in the order they were taken
            local = sequential_pairs(span.count, overlap) | spread_pairs(
                span.count, span.count, CROSS_PAIRS_PER_FRAME * span.count, same=True
            )
            if span.thumbs is not None:
                local |= loop_pairs(span.thumbs, overlap)
        pairs |= {(span.start + i, span.start + j) for i, j in local}
    for a, b in itertools.combinations(spans, 2):
        budget = CROSS_PAIRS_PER_FRAME * (a.count + b.count)
        pairs |= {(a.start + i, b.start + j) for i, j in spread_pairs(a.count, b.count, budget)}
    return pairs


def spread_pairs(na: int, nb: int, budget: int, *, same: bool = False) -> set[tuple[int, int]]:
    """Pairs (i, j) of positions in two lists, all of them or, beyond `budget`, an even spread
    (j = i modulo a stride): every i meets every stride-th j all along the other list. With
    `same`, the two lists are one (pairs i < j)."""
    total = na * (na - 1) // 2 if same else na * nb
    stride = max(1, math.ceil(total / max(budget, 1)))
    found = set()
    for i in range(na):
        for j in range(i % stride, nb, stride):
            if not same or j > i:
                found.add((i, j))
            elif j < i:
                found.add((j, i))
    return found


def match_features(
    db: Path,
    names: list[str],
    pairs: set[tuple[int, int]],
    work_dir: Path,
    opts: SfmOptions,
    progress: ProgressFn,
) -> int:
    """Match and geometrically verify the given pairs of frame positions; returns their
    number. The full list is kept in work_dir/pairs.txt."""
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = opts.num_threads
    ordered = sorted(pairs)
    lines = [f"{names[i]} {names[j]}\n" for i, j in ordered]
    if not lines:
        return 0
    with (work_dir / "pairs.txt").open("a") as f:
        f.writelines(lines)
    pairs_file = work_dir / "pairs_to_match.txt"
    pairs_file.write_text("".join(lines))
    imported = pycolmap.ImportedPairingOptions()
    imported.match_list_path = str(pairs_file)
    # One call (each call indexes its frames' descriptors again: 767 pairs of the synthetic
    # orbit, 16 calls 20.8 s, one call 16.7 s); COLMAP logs a line per block of pairs, which
    # gives the progress.
    imported.block_size = min(
        MAX_MATCH_BLOCK, max(len(names), math.ceil(len(lines) / PROGRESS_STEPS))
    )
    with colmap_log.progress_from_log() as log:
        run_polled(
            lambda: pycolmap.match_image_pairs(
                db, matching_options=matching, pairing_options=imported
            ),
            lambda: min(len(lines), log.count() * imported.block_size),
            len(lines),
            progress,
        )
    pairs_file.unlink(missing_ok=True)
    return len(lines)


@dataclass
class PairStats:
    """How well neighbouring frames matched."""

    neighbours: int
    neighbours_verified: int
    verified_pairs: int
    rotation_only_fraction: float  # verified pairs that a homography explains (no parallax)
    median_features: int = 0  # SIFT features per frame (median): how textured the frames are


def pair_stats(db: Path, names: list[str], min_inliers: int = 30) -> PairStats:
    """Matching outcome, used to explain a failed reconstruction."""
    database = pycolmap.Database.open(db)
    try:
        ids = {im.image_id: im.name for im in database.read_all_images()}
        features = [database.read_keypoints(i).shape[0] for i in ids]
        pair_ids, geometries = database.read_two_view_geometries()
    finally:
        database.close()
    order = {name: k for k, name in enumerate(names)}
    neighbours_ok = 0
    inliers: list[int] = []
    rotation_only = 0
    panoramic = {
        pycolmap.TwoViewGeometryConfiguration.PANORAMIC,
        pycolmap.TwoViewGeometryConfiguration.PLANAR_OR_PANORAMIC,
    }
    for pair_id, geom in zip(pair_ids, geometries, strict=True):
        count = len(geom.inlier_matches)
        if count < min_inliers:
            continue
        inliers.append(count)
        rotation_only += geom.config in panoramic
        a, b = pycolmap.pair_id_to_image_pair(pair_id)
        ka, kb = order.get(ids.get(a, ""), -9), order.get(ids.get(b, ""), -9)
        neighbours_ok += abs(ka - kb) == 1
    return PairStats(
        neighbours=max(len(names) - 1, 0),
        neighbours_verified=neighbours_ok,
        verified_pairs=len(inliers),
        rotation_only_fraction=rotation_only / len(inliers) if inliers else 0.0,
        median_features=int(np.median(features)) if features else 0,
    )


def run_mapping(
    db: Path,
    image_dir: Path,
    out_dir: Path,
    n_images: int,
    required: int,
    opts: SfmOptions,
    progress: ProgressFn,
    enough: int | None = None,
) -> list[pycolmap.Reconstruction]:
    """Reconstruct camera poses and points; models sorted best first (most registered).

    The incremental mapper stops as soon as the outcome is decided: once a finished model has
    `required` frames and at least half of them (no later model can be larger), or after
    MAX_FAILED_ATTEMPTS starts that did not reach `required` (the video cannot pass the gate),
    or, given `enough`, as soon as the model being built has that many frames.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    pycolmap.set_random_seed(opts.seed)
    progress(0, n_images)
    if opts.mapper == "global":
        options = pycolmap.GlobalPipelineOptions()
        options.num_threads = opts.num_threads
        options.random_seed = opts.seed
        options.mapper.track_required_tracks_per_view = 1000
        models = list(pycolmap.global_mapping(db, image_dir, out_dir, options).values())
    else:
        models = _incremental(db, image_dir, n_images, required, opts, progress, enough)
        for k, model in enumerate(models):
            (out_dir / str(k)).mkdir()
            model.write(out_dir / str(k))
    # A model without 3D points cannot be trained on, however many frames it placed (the
    # mapper can place frames of a camera that only turns, then filters every point seen at
    # under 1.5 degrees): models with points first.
    ranked = sorted(
        models,
        key=lambda r: (r.num_points3D() > 0, r.num_reg_images(), r.num_points3D()),
        reverse=True,
    )
    progress(ranked[0].num_reg_images() if ranked else 0, n_images)
    return ranked


MAX_FAILED_ATTEMPTS = 8


def _incremental(
    db: Path,
    image_dir: Path,
    n_images: int,
    required: int,
    opts: SfmOptions,
    progress: ProgressFn,
    enough: int | None = None,
) -> list[pycolmap.Reconstruction]:
    options = pycolmap.IncrementalPipelineOptions()
    options.num_threads = opts.num_threads
    options.random_seed = opts.seed
    options.image_path = str(image_dir)  # point colours come from the frames
    options.mapper.ba_global_ignore_redundant_points3D = True
    # Global bundle adjustment when the model has grown by 40 % (COLMAP: 10 %). Measured on
    # the 100-frame 960x540 synthetic orbit: mapping 42.5 -> 29.4 s, same 100 frames, points
    # and reprojection error (0.422 -> 0.421 px); 1.6 was slower again (more local work).
    options.ba_global_frames_ratio = 1.4
    options.ba_global_points_ratio = 1.4
    # One bundle adjustment per step instead of repeating it after each filter and merge of
    # tracks until nothing changes (COLMAP: up to 2 local and 5 global rounds). Measured on
    # the synthetic orbit's database: mapping 40.3 -> 27.3 s (CPU 44.5 -> 28.8 s), same 100
    # frames, 0.423 -> 0.422 px, camera centres 0.036 -> 0.037 % of the radius (mean) and
    # 0.074 -> 0.072 % (max). The final global adjustment still runs to convergence.
    options.ba_local_max_refinements = 1
    options.ba_global_max_refinements = 1
    # Keep observations within 2 px (COLMAP: 4). Measured on the synthetic orbit: mean
    # reprojection error 0.51 -> 0.42 px, camera centres closer to the truth (max 0.088 ->
    # 0.067 % of the radius), 6 % more points; the office video keeps all its points. The
    # triangulation thresholds must match, or points are made and filtered again and again
    # (mapping 2.5 times slower).
    options.mapper.filter_max_reproj_error = 2.0
    options.triangulation.complete_max_reproj_error = 2.0
    options.triangulation.merge_max_reproj_error = 2.0
    database = pycolmap.Database.open(db)
    manager = pycolmap.ReconstructionManager()
    pipeline = pycolmap.IncrementalPipeline(options, database, manager)
    state = {"attempts": 0, "current": 0, "best": 0}

    def stop() -> None:
        # The pipeline reads its (shared) options as it goes: a runtime limit that has already
        # passed ends it cleanly after the current step, keeping the models built so far.
        options.max_runtime_seconds = 1

    def check() -> None:
        state["best"] = max(state["best"], state["current"])
        decided = state["best"] >= required and 2 * state["best"] >= n_images
        hopeless = state["attempts"] >= MAX_FAILED_ATTEMPTS and state["best"] < required
        if decided or hopeless:
            stop()

    def on_start() -> None:
        check()  # the previous attempt may have ended without a last-image callback
        state["attempts"] += 1
        state["current"] = 2
        progress(2, n_images)

    def on_image() -> None:
        state["current"] += 1
        progress(min(state["current"], n_images), n_images)
        if enough is not None and state["current"] >= enough:
            # COLMAP checks its runtime limit only between models; a Python exception raised
            # here leaves run() at once (pybind11 carries it through), and the manager keeps
            # the model as far as it got (the orbit's 58 frames: 5 placed in 1.1 s, 22 s for
            # all).
            raise _Enough

    callbacks = pycolmap.IncrementalPipelineCallback
    pipeline.add_callback(callbacks.INITIAL_IMAGE_PAIR_REG_CALLBACK, on_start)
    pipeline.add_callback(callbacks.NEXT_IMAGE_REG_CALLBACK, on_image)
    pipeline.add_callback(callbacks.LAST_IMAGE_REG_CALLBACK, check)
    try:
        pipeline.run()
    except _Enough:
        pass
    finally:
        database.close()
    return [manager.get(k) for k in range(manager.size())]


class _Enough(Exception):
    """Raised from the mapper's callback: the model has as many frames as asked for."""


@dataclass
class PathCheck:
    """How consistent a model's camera path is with the order of the video's frames."""

    jump_ratio: float  # largest step over the median step around it
    weakest_link: int  # fewest 3D points seen on both sides of a cut between neighbours
    weakest_link_ratio: float  # that over the median cut
    # Points seen in the LINK_WINDOW frames on both sides of the largest step (observations
    # that reproject within LINK_MAX_ERROR_PX only), and that over the median of the same
    # count at every cut; None: not measured.
    jump_link: int | None = None
    jump_link_ratio: float | None = None
    # Every step: (frame position before it, its jump ratio, points joining it, that over
    # the median); empty: not measured.
    steps: list[tuple[int, float, int, float]] = field(default_factory=list, repr=False)

    def jump_is_weak(self, min_link_ratio: float = 0.1, min_link_points: int = 15) -> bool:
        """Whether few points join the two sides of the largest step: a misplaced block, not a
        fast move (unknown counts as weak)."""
        if self.jump_link is None or self.jump_link_ratio is None:
            return True
        return self.jump_link_ratio < min_link_ratio or self.jump_link < min_link_points

    def misplaced(
        self, max_jump: float, min_link_ratio: float = 0.1, min_link_points: int = 15
    ) -> bool:
        """Whether the path jumps and the jump is weakly connected: a block of frames placed
        in the wrong spot. A large step that many points cross is a fast move (or frames
        dropped from the video), which the model measured."""
        if max_jump <= 0:
            return False
        if self.steps:
            return any(
                ratio > max_jump and (share < min_link_ratio or link < min_link_points)
                for _, ratio, link, share in self.steps
            )
        return self.jump_ratio > max_jump and self.jump_is_weak(min_link_ratio, min_link_points)

    def weakest_jump(self, max_jump: float) -> tuple[float, int, float] | None:
        """The step above `max_jump` with the fewest points joining it: (ratio, points,
        share of the median)."""
        jumps = [(share, ratio, link) for _, ratio, link, share in self.steps if ratio > max_jump]
        if not jumps:
            return None
        share, ratio, link = min(jumps)
        return ratio, link, share

    def suspicious(
        self, max_jump: float, min_link_ratio: float = 0.1, min_link_points: int = 15
    ) -> bool:
        """Whether the model looks like a block of frames placed in the wrong spot."""
        weak = self.weakest_link_ratio < min_link_ratio or self.weakest_link < min_link_points
        weak = weak or any(
            share < min_link_ratio or link < min_link_points for _, _, link, share in self.steps
        )
        return max_jump > 0 and (self.misplaced(max_jump, min_link_ratio, min_link_points) or weak)


# Observations that reproject farther than this do not join two parts of a path: the mapper
# keeps observations within 2 px, so this only drops those of cameras placed elsewhere.
LINK_MAX_ERROR_PX = 4.0
# Frames on each side of a cut whose points count as joining it.
LINK_WINDOW = 3


def step_ratios(centres: list[np.ndarray | None], window: int = 5) -> dict[int, float]:
    """Each step between neighbouring registered frames (per frame of gap) relative to the
    median step around it, keyed by the frame position where the step starts."""
    reg = [(k, c) for k, c in enumerate(centres) if c is not None]
    if len(reg) < 4:
        return {}
    steps = np.array(
        [np.linalg.norm(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(reg)]
    )
    ratios = {}
    for k, step in enumerate(steps):
        lo, hi = max(0, k - window), min(len(steps), k + window + 1)
        around = np.delete(steps[lo:hi], k - lo)
        ref = float(np.median(around)) if len(around) else 0.0
        if ref > 0:
            ratios[reg[k][0]] = float(step) / ref
    return ratios


def largest_jump(centres: list[np.ndarray | None], window: int = 5) -> tuple[float, int]:
    """Largest step between neighbouring registered frames (per frame of gap) relative to the
    median step around it, and the frame position where that step starts (-1: none)."""
    ratios = step_ratios(centres, window)
    if not ratios:
        return 0.0, -1
    at = max(ratios, key=lambda k: ratios[k])
    return ratios[at], at


def jump_ratio(centres: list[np.ndarray | None], window: int = 5) -> float:
    """Largest step between neighbouring registered frames (per frame of gap) relative to the
    median step around it. A video's camera path is smooth; a misplaced block jumps."""
    return largest_jump(centres, window)[0]


def cut_links(tracks: list[tuple[int, int]], registered: list[int]) -> dict[int, int]:
    """Points whose track spans each cut between neighbouring registered frames, by the
    position of the frame before the cut. `tracks` holds each point's first and last frame."""
    order = sorted(registered)
    diff = np.zeros(max(order) + 2) if order else np.zeros(1)
    for first, last in tracks:
        diff[first] += 1
        diff[last] -= 1
    spanning = np.cumsum(diff)
    return {a: int(spanning[a]) for a in order[:-1]}


def weakest_link(tracks: list[tuple[int, int]], registered: list[int]) -> tuple[int, float]:
    """Fewest points whose track spans a cut between neighbouring registered frames, and that
    over the median cut. `tracks` holds each point's first and last frame position. Frames
    placed wrongly as a block share almost no points with the rest: a weak link."""
    if len(registered) < 3:
        return 0, 1.0
    cuts = np.array(list(cut_links(tracks, registered).values()))
    median = float(np.median(cuts))
    return int(cuts.min()), float(cuts.min() / median) if median > 0 else 0.0


def consistent_observations(
    model: pycolmap.Reconstruction, image_pos: dict[int, int], max_error: float
) -> dict[int, list[int]]:
    """Frame positions of each point's observations that reproject within `max_error` pixels
    (a camera moved away from its points does not join them to the rest)."""
    seen: dict[int, list[int]] = {}
    for image_id, pos in image_pos.items():
        image = model.images[image_id]
        obs = [p for p in image.points2D if p.has_point3D()]
        if not obs:
            continue
        ids = [p.point3D_id for p in obs]
        xyz = np.array([model.points3D[i].xyz for i in ids])
        pose = image.cam_from_world()
        cam = xyz @ pose.rotation.matrix().T + pose.translation
        front = cam[:, 2] > 1e-9
        err = np.full(len(ids), np.inf)
        if front.any():
            uv = np.asarray(model.cameras[image.camera_id].img_from_cam(cam[front]))
            err[front] = np.linalg.norm(uv - np.array([p.xy for p in obs])[front], axis=1)
        for point_id, e in zip(ids, err, strict=True):
            if e <= max_error:
                seen.setdefault(point_id, []).append(pos)
    return seen


def links_across(
    seen: dict[int, list[int]], registered: list[int], window: int = LINK_WINDOW
) -> dict[int, int]:
    """For each cut between neighbouring registered frames (keyed by the position of the frame
    before it): points observed consistently both in the `window` registered frames before the
    cut and in the `window` after it. A block of cameras moved away from its points has
    almost none at its borders, however long the tracks around it are."""
    order = sorted(registered)
    if len(order) < 2 or not seen:
        return {a: 0 for a in order[:-1]}
    column = {pos: k for k, pos in enumerate(order)}
    matrix = np.zeros((len(seen), len(order)), bool)
    for row, positions in enumerate(seen.values()):
        matrix[row, [column[p] for p in positions]] = True
    links = {}
    for k in range(len(order) - 1):
        before = matrix[:, max(0, k + 1 - window) : k + 1].any(axis=1)
        after = matrix[:, k + 1 : k + 1 + window].any(axis=1)
        links[order[k]] = int((before & after).sum())
    return links


def check_path(model: pycolmap.Reconstruction, names: list[str]) -> PathCheck:
    """Path consistency of a model whose images are the named frames, in video order."""
    position = {name: k for k, name in enumerate(names)}
    # Only the named frames (one video of a capture with several sources).
    posed = [im for im in model.images.values() if im.has_pose and im.name in position]
    image_pos = {im.image_id: position[im.name] for im in posed}
    centres: list[np.ndarray | None] = [None] * len(names)
    for im in posed:
        centres[position[im.name]] = im.projection_center()
    seen = consistent_observations(model, image_pos, LINK_MAX_ERROR_PX)
    tracks = [(min(ks), max(ks)) for ks in seen.values()]
    registered = list(image_pos.values())
    link, link_ratio = weakest_link(tracks, registered)
    ratio, at = largest_jump(centres)
    links = links_across(seen, registered)
    jump_link: int | None = None
    jump_link_ratio: float | None = None
    # Every step: (frame position before it, its jump ratio, points joining it, that over
    # the median); empty: not measured.
    steps: list[tuple[int, float, int, float]] = field(default_factory=list, repr=False)
    median = float(np.median(list(links.values()))) if links else 0.0

    def share(count: int) -> float:
        return count / median if median > 0 else 0.0

    if at in links:
        jump_link, jump_link_ratio = links[at], share(links[at])
    steps = [
        (k, r, links[k], share(links[k])) for k, r in step_ratios(centres).items() if k in links
    ]
    return PathCheck(ratio, link, link_ratio, jump_link, jump_link_ratio, steps)


def camera_info(camera: pycolmap.Camera) -> dict[str, Any]:
    """Model, size and named parameters of a camera."""
    names = camera.params_info.split(", ")
    params = {n: round(float(p), 6) for n, p in zip(names, camera.params, strict=True)}
    return {"model": camera.model_name, "width": camera.width, "height": camera.height, **params}


def model_stats(model: pycolmap.Reconstruction) -> dict[str, Any]:
    """Registration numbers and the camera of a reconstruction."""
    return {
        "frames_registered": model.num_reg_images(),
        "points3D": model.num_points3D(),
        "mean_reprojection_error_px": round(float(model.compute_mean_reprojection_error()), 4),
        "mean_track_length": round(float(model.compute_mean_track_length()), 3),
        "camera_distorted": camera_info(next(iter(model.cameras.values()))),
    }


def scene_of(model_dir: Path) -> dict[str, Any]:
    """The `scene` object (pipeline.scene) of the model in `model_dir`: its upright frame
    from the registered cameras in frame (name) order and all its points."""
    model = pycolmap.Reconstruction(model_dir)
    images = sorted((im for im in model.images.values() if im.has_pose), key=lambda im: im.name)
    poses = [im.cam_from_world() for im in images]
    rotations = np.array([pose.rotation.matrix() for pose in poses])
    translations = np.array([pose.translation for pose in poses])
    points = np.array([p.xyz for p in model.points3D.values()]).reshape(-1, 3)
    return scene_object(rotations, translations, points if len(points) else None)


def dataset_cameras(out_dir: Path) -> list[dict[str, Any]]:
    """Every undistorted camera of the dataset (one per source of the capture)."""
    model = pycolmap.Reconstruction(out_dir / "sparse" / "0")
    return [camera_info(model.cameras[k]) for k in sorted(model.cameras)]


def _dataset_camera(out_dir: Path) -> dict[str, Any]:
    model = pycolmap.Reconstruction(out_dir / "sparse" / "0")
    return camera_info(next(iter(model.cameras.values())))


def undistort(
    model_dir: Path,
    image_dir: Path,
    out_dir: Path,
    n_images: int,
    opts: SfmOptions,
    progress: ProgressFn,
) -> dict[str, Any]:
    """Undistort to PINHOLE into out_dir/{images,sparse/0} (classic cameras/images/points3D.bin
    only); returns the undistorted camera."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    images_out = out_dir / "images"
    run_polled(
        lambda: pycolmap.undistort_images(
            out_dir,
            model_dir,
            image_dir,
            output_type="COLMAP",
            jpeg_quality=95,
            num_threads=opts.num_threads,
        ),
        lambda: sum(1 for _ in images_out.iterdir()) if images_out.is_dir() else 0,
        n_images,
        progress,
    )
    _keep_only_model(out_dir, out_dir / "sparse")
    return _dataset_camera(out_dir)


def copy_distorted(
    model_dir: Path, image_dir: Path, out_dir: Path, names: list[str], progress: ProgressFn
) -> dict[str, Any]:
    """The --skip_undistortion layout: registered frames and the model as they are."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "images").mkdir(parents=True)
    registered = {im.name for im in pycolmap.Reconstruction(model_dir).images.values()}
    kept = [n for n in names if n in registered]
    for k, name in enumerate(kept, 1):
        shutil.copy2(image_dir / name, out_dir / "images" / name)
        progress(k, len(kept))
    (out_dir / "sparse").mkdir()
    for f in MODEL_FILES:
        shutil.copy2(model_dir / f, out_dir / "sparse" / f)
    _keep_only_model(out_dir, out_dir / "sparse")
    return _dataset_camera(out_dir)


def _keep_only_model(out_dir: Path, flat: Path) -> None:
    """Move the three classic model files into sparse/0 and drop everything else COLMAP wrote."""
    target = out_dir / "sparse" / "0"
    staging = out_dir / "sparse_0"
    staging.mkdir()
    for f in MODEL_FILES:
        (flat / f).replace(staging / f)
    shutil.rmtree(flat)
    target.parent.mkdir()
    staging.replace(target)
    for extra in out_dir.iterdir():
        if extra.name not in ("images", "sparse"):
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
