"""The preprocessing stage on synthetic footage with tiny stand-in models of the official signatures."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.prepare_helpers import PLATE_FPS, PLATE_FRAMES, PLATE_SIZE, character, plate, tiny_ckpt  # noqa: F401

from renderer.prepare import PrepareError, PrepareSettings, prepare
from renderer.prepare.footage import letterbox, resample_indices, resampled_count, size_by_area
from renderer.prepare.synthetic import FIGURE, figure_center
from renderer.video_io import read_video, video_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SAM2 = lambda ckpt: str(ckpt / "sam2" / "tiny_sam2.yaml")  # noqa: E731


def settings(mode="animate", **kw):
    return PrepareSettings(mode=mode, fps=30, area=(160, 96), preview_frames=3, **kw)


def test_resample_rule_and_size_rule():
    # 48 frames at 24 fps = 2 s -> 60 frames at 30 fps; frame i shows plate frame round(i * 24 / 30)
    idx = resample_indices(48, 24.0, 30)
    assert len(idx) == 60 and idx[:6] == [0, 1, 2, 2, 3, 4] and idx[-1] == 47
    assert resampled_count(10, 25.0, 30) == 12  # 0.4 s -> int(12.0)
    assert resampled_count(7, 25.0, 30) == 8  # 0.28 s -> 8.4 -> 8: never longer than the plate
    assert size_by_area(1920, 1080, 1280 * 720) == (1280, 720)
    assert size_by_area(1080, 1920, 1280 * 720) == (720, 1280)
    w, h = size_by_area(1000, 700, 832 * 480)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 832 * 480 and abs(w / h - 1000 / 700) < 0.05
    boxed = letterbox(np.full((50, 100, 3), 200, np.uint8), 100, 100)  # wide into square: bars top and bottom
    assert boxed.shape == (100, 100, 3) and boxed[:20].max() == 0 and boxed[30:70].min() == 200


def test_detector_decoding_both_formats():
    from renderer.prepare.detect import PersonDetector, decode_detections, nms

    v10 = np.array([[[64, 64, 128, 320, 0.8, 0], [0, 0, 640, 640, 0.9, 2], [66, 66, 130, 322, 0.7, 0]]], np.float32)
    rows = decode_detections(v10, (480, 320))  # frame 320 wide, 480 tall: x * 0.5, y * 0.75
    assert np.allclose(rows[0, :4], [32, 48, 64, 240])
    det = PersonDetector.__new__(PersonDetector)
    det.conf, det.iou = 0.05, 0.5
    best = det.select(rows, (480, 320))  # the surer class-2 box is not a person; the overlapping twin is suppressed
    assert np.allclose(best, [32, 48, 64, 240, 0.8])
    assert nms(rows[[0, 2], :4], rows[[0, 2], 4], 0.5) == [0]
    v8 = np.zeros((1, 84, 3), np.float32)
    v8[0, :4, 1] = [320, 320, 100, 200]  # cx, cy, w, h
    v8[0, 4, 1] = 0.6  # person score
    rows = decode_detections(v8, (640, 640))
    assert np.allclose(rows[1], [270, 220, 370, 420, 0.6, 0])
    with pytest.raises(PrepareError, match="expected"):
        decode_detections(np.zeros((1, 5, 5)), (10, 10))


def test_box_and_keypoints_follow_the_figure(tiny_ckpt, plate):
    from renderer.prepare.detect import PersonDetector
    from renderer.prepare.pose import WholeBodyPose

    det = PersonDetector(tiny_ckpt / "det/yolov10m.onnx")
    pose = WholeBodyPose(tiny_ckpt / "pose2d/vitpose_h_wholebody.onnx")
    frames = read_video(plate)
    w, h = PLATE_SIZE
    fig_h = h * 0.8
    for t in (0, PLATE_FRAMES - 1):
        cx, cy = figure_center(t, PLATE_FRAMES, w, h)
        box, found = det(frames[t])
        assert found
        # the figure spans head top (-0.48) to ankles (+0.48) of its height: box within ~3 px (640-grid rounding)
        assert abs(box[1] - (cy - 0.48 * fig_h)) < 4 and abs(box[3] - (cy + 0.48 * fig_h + 2)) < 5
        assert box[0] < cx - 0.18 * fig_h + 2 and box[2] > cx + 0.18 * fig_h - 2
        kp = pose(frames[t], box)
        assert kp.shape == (133, 3) and kp[:, 2].min() > 0.9
        for i, name in ((9, "lwri"), (10, "rwri"), (15, "lank"), (16, "rank")):
            u, v = FIGURE[name]
            # the tiny pose model assumes the box equals the figure extent; the box's few-pixel slack bounds the error
            assert np.hypot(kp[i, 0] - (cx + u * fig_h), kp[i, 1] - (cy + v * fig_h)) < 4, name


def test_face_box_rule():
    from renderer.prepare.skeleton import face_box, face_crop

    kp = np.zeros((133, 3), np.float32)
    kp[23:91, 0] = np.linspace(40, 60, 68)  # face keypoints span 20 x 20
    kp[23:91, 1] = np.linspace(50, 70, 68)
    x0, y0, x1, y1 = face_box(kp, (200, 200))
    # area x1.3 at the same aspect: each side sqrt(1.3) * 20 = 22.8; width grows evenly, height 3:1 upward
    assert (x0, x1) == (38, 61) and (y0, y1) == (47, 70)
    assert face_box(kp, (60, 200))[3] == 60  # clipped to the frame
    crop = face_crop(np.zeros((200, 200, 3), np.uint8), kp)
    assert crop.shape == (512, 512, 3)


def test_mask_dilation_and_grid_fill():
    from renderer.prepare.mask import background, dilate, grid_fill, key_frames, refine

    m = np.zeros((60, 60), np.uint8)
    m[30, 30] = 1
    grown = dilate(m, k=7, iterations=3)  # each pass grows 3 px per side: 1 + 2*9 = 19
    ys, xs = np.nonzero(grown)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (21, 39, 21, 39) and grown.sum() == 19 * 19
    ell = np.zeros((40, 40), np.uint8)
    ell[0:40, 0:4] = 1
    ell[36:40, 0:40] = 1  # an L: the 1x1 grid fills its whole box, a 2x2 grid leaves the empty upper-right cell
    assert grid_fill(ell, 1, 1)[:39, :39].all()
    g2 = grid_fill(ell, 2, 2)
    assert g2[:19, :19].all() and not g2[:19, 20:38].any()
    assert refine(m, 7, 0, 1, 1).sum() == 1  # iterations=0: the raw mask
    frame = np.full((60, 60, 3), 100, np.uint8)
    bg = background(frame, grown)
    assert bg[30, 30].max() == 0 and bg[0, 0].min() == 100
    assert key_frames(400) == [0, 100, 200, 300] and key_frames(3) == [0]


def test_retarget_takes_the_reference_proportions():
    from renderer.prepare.skeleton import body20, retarget
    from renderer.prepare.synthetic import _keypoint_template

    src = np.concatenate([_keypoint_template() * 100 + 100, np.ones((133, 1))], 1)  # [133,3], figure 100 px tall
    ref = src.copy()
    ref[:, 1] = (ref[:, 1] - 100) * 1.5 + 100  # a reference 1.5x as tall
    track = np.stack([src, src + [10, 0, 0]])  # two frames, the second moved 10 px right
    out = retarget(track, ref, (300, 300), (300, 300))
    b0, b1, r = body20(out[0]), body20(out[1]), body20(ref)
    leg = lambda b: np.hypot(*(b[9, :2] - b[8, :2]))  # noqa: E731  (right hip -> right knee)
    assert abs(leg(b0) - leg(r)) < 1e-6 and np.allclose(b0[1, :2], r[1, :2])
    assert np.allclose(b1[:, :2] - b0[:, :2], [10, 0])  # motion is kept


def test_prepare_animate_writes_the_folder_and_reuses_it(tmp_path, tiny_ckpt, plate, character):
    out = tmp_path / "prep"
    meta = prepare(plate, character, out, settings(), checkpoint_root=tiny_ckpt, progress=False)
    n = resampled_count(PLATE_FRAMES, PLATE_FPS, 30)  # 0.5 s at 30 fps = 15
    assert not meta["cached"] and meta["frames"] == n == 15 and meta["fps"] == 30
    assert (meta["width"], meta["height"]) == (96, 160)  # the character's portrait shape at area 160*96
    pose = video_info(out / "src_pose.mp4")
    assert (pose["frames"], pose["width"], pose["height"], pose["fps"]) == (n, 96, 160, 30.0)
    face = video_info(out / "src_face.mp4")
    assert (face["frames"], face["width"], face["height"]) == (n, 512, 512)
    from PIL import Image

    assert Image.open(out / "src_ref.png").size == (96, 160)
    sheet = Image.open(out / "preview.png")
    assert sheet.size[1] == 3 * 160  # rows: annotated plate, pose, face
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["plate"]["frames"] == PLATE_FRAMES and on_disk["plate"]["fps"] == PLATE_FPS
    assert set(on_disk["models"]["fingerprints"]) == {"detector", "pose"} and len(on_disk["plate"]["sha256"]) == 64
    assert not (out / "src_mask.mp4").exists()
    # the face track is the head: mostly the white disk of the drawn figure
    assert read_video(out / "src_face.mp4")[:, 200:312, 200:312].mean() > 200
    # resubmit: same inputs -> reused without touching a file
    stamp = (out / "src_pose.mp4").stat().st_mtime_ns
    again = prepare(plate, character, out, settings(), checkpoint_root=tiny_ckpt, progress=False)
    assert again["cached"] and (out / "src_pose.mp4").stat().st_mtime_ns == stamp
    # other settings into the same folder: refused, nothing lost; force keeps the old one beside it
    with pytest.raises(PrepareError, match="already holds"):
        prepare(plate, character, out, settings(face_scale=1.5), checkpoint_root=tiny_ckpt, progress=False)
    assert (out / "src_pose.mp4").stat().st_mtime_ns == stamp
    prepare(plate, character, out, settings(face_scale=1.5), checkpoint_root=tiny_ckpt, force=True, progress=False)
    prev = list(tmp_path.glob("prep.prev-*"))
    assert len(prev) == 1 and json.loads((prev[0] / "meta.json").read_text())["cache_key"] == meta["cache_key"]
    assert not list(tmp_path.glob(".prep.tmp-*"))  # no temporary folder left behind


def test_prepare_replace_mask_and_background(tmp_path, tiny_ckpt, plate, character):
    out = tmp_path / "prep"
    s = settings("replace", sam2_config=TINY_SAM2(tiny_ckpt))
    meta = prepare(plate, character, out, s, checkpoint_root=tiny_ckpt, progress=False)
    assert (meta["width"], meta["height"]) == PLATE_SIZE and meta["models"]["sam2"].endswith("sam2_hiera_large.pt")
    mask = read_video(out / "src_mask.mp4")
    bg = read_video(out / "src_bg.mp4")
    assert mask.shape == bg.shape == (15, 96, 160, 3)
    inside = mask[..., 0] > 200
    assert inside.any(axis=(1, 2)).all()  # every frame has a character mask
    assert bg[inside].mean() < 12  # blacked out under the mask (codec noise only)
    # the mask is dilated with the official 7x7 x 3: never thinner than 19 px where SAM2 found anything
    assert inside.sum(axis=(1, 2)).min() >= 19 * 19


def test_missing_or_wrong_checkpoint_fails_before_any_frame(tmp_path, tiny_ckpt, plate, character, monkeypatch):
    import shutil

    import renderer.prepare.stage as stage

    def no_decoding(*a, **k):
        raise AssertionError("a frame was decoded before the checkpoints were checked")

    monkeypatch.setattr(stage, "read_plate", no_decoding)
    with pytest.raises(PrepareError, match="det/yolov10m.onnx"):
        prepare(plate, character, tmp_path / "a", settings(), checkpoint_root=tmp_path / "nowhere", progress=False)
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_ckpt, wrong)
    shutil.copy(wrong / "pose2d/vitpose_h_wholebody.onnx", wrong / "det/yolov10m.onnx")  # the pose model as detector
    with pytest.raises(PrepareError, match=r"expected one input \[1,3,640,640\]"):
        prepare(plate, character, tmp_path / "b", settings(), checkpoint_root=wrong, progress=False)
    (wrong / "det/yolov10m.onnx").write_bytes(b"not a model")
    with pytest.raises(PrepareError, match="not a readable ONNX model"):
        prepare(plate, character, tmp_path / "c", settings(), checkpoint_root=wrong, progress=False)
    shutil.copy(tiny_ckpt / "det/yolov10m.onnx", wrong / "det/yolov10m.onnx")
    (wrong / "sam2/sam2_hiera_large.pt").write_bytes(b"garbage")
    with pytest.raises(PrepareError, match="SAM2 checkpoint .* not a readable weights file"):
        prepare(plate, character, tmp_path / "d", settings("replace", sam2_config=TINY_SAM2(tiny_ckpt)),
                checkpoint_root=wrong, progress=False)
    with pytest.raises(PrepareError, match="does not fit"):  # real tiny weights against the hiera-large config
        prepare(plate, character, tmp_path / "e", settings("replace"), checkpoint_root=tiny_ckpt, progress=False)
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_cli_prepare(tmp_path, tiny_ckpt, plate, character, capsys):
    from renderer.cli import main

    common = [f"plate={plate}", f"image={character}", f"prepare.checkpoint={tiny_ckpt}", "prepare.area=[160,96]",
              "prepare.device=cpu"]
    # one real process: the console command's exit code and output
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "renderer.cli", "prepare", *common, "mode=animate",
                          f"out={tmp_path / 'p'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "15 frames 96x160 at 30 fps" in res.stdout and (tmp_path / "p/preview.png").is_file()
    # the rest in this process (same entry point, no interpreter start-up per case)
    assert main(["prepare", *common, "mode=animate", f"out={tmp_path / 'p'}"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["prepare", *common, "mode=dance", f"out={tmp_path / 'q'}"]) == 2
    assert "mode='dance'" in capsys.readouterr().err
    assert main(["prepare", f"image={character}", f"out={tmp_path / 'q'}"]) == 2
    assert "plate=" in capsys.readouterr().err
    assert main(["prepare", f"plate={tmp_path / 'none.mp4'}", f"image={character}", f"out={tmp_path / 'q'}"]) == 2
    assert "plate not found" in capsys.readouterr().err
    assert main(["prepare", *common, "mode=replace", f"prepare.checkpoint={tmp_path}", f"out={tmp_path / 'q'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_prepared_folder_reads_back_as_renderer_inputs(tmp_path, tiny_ckpt, plate, character):
    from renderer.prepare.folder import load_prepared

    out = tmp_path / "prep"
    prepare(plate, character, out, settings("replace", sam2_config=TINY_SAM2(tiny_ckpt)), checkpoint_root=tiny_ckpt,
            progress=False)
    inp = load_prepared(out)
    assert inp["mode"] == "replace"
    assert inp["pose"].shape == (3, 15, 96, 160) and inp["face"].shape == (3, 15, 512, 512)
    assert inp["reference"].shape == (3, 96, 160) and inp["background"].shape == (3, 15, 96, 160)
    assert inp["mask"].shape == (15, 96, 160) and set(inp["mask"].unique().tolist()) <= {0.0, 1.0}
    assert inp["pose"].min() >= -1 and inp["pose"].max() <= 1
    assert inp["background"][:, inp["mask"] > 0].mean() < -0.9  # blacked out under the mask
    from renderer.prepare.folder import provenance

    side = provenance(out)
    assert side["plate"]["sha256"] == json.loads((out / "meta.json").read_text())["plate"]["sha256"]
    assert side["models"]["sam2"].endswith("sam2_hiera_large.pt") and side["settings"]["mask_kernel"] == 7
    # the rendered shot gets the plate's length and sound (a render 2 frames long here)
    from renderer.prepare.audio import audio_duration
    from renderer.prepare.folder import write_shot_from_plate

    rendered = np.zeros((17, 96, 160, 3), np.uint8)
    mp4 = write_shot_from_plate(rendered, out, tmp_path / "shot.mp4", metadata={"title": "replace"})
    assert video_info(mp4)["frames"] == 15 and abs(audio_duration(mp4) - 0.5) < 0.025
    with pytest.raises(PrepareError, match="src_bg.mp4"):
        (out / "src_bg.mp4").unlink()
        load_prepared(out)
