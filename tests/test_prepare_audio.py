"""Length and audio of plate-driven shots: exactly the plate's frames at the render fps, its audio in sync."""
import numpy as np
import pytest

pytest.importorskip("cv2")

from renderer.prepare.audio import audio_duration, conform_frames, has_audio, plate_frame_count, write_with_plate
from renderer.prepare.synthetic import stick_figure_plate
from renderer.video_io import read_mp4_metadata, read_video, video_info


def test_conform_frames_trims_or_holds_the_last_frame():
    frames = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1).repeat(3, axis=3)  # [5,1,1,3], value = index
    assert conform_frames(frames, 3)[:, 0, 0, 0].tolist() == [0, 1, 2]
    assert conform_frames(frames, 7)[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4]
    with pytest.raises(ValueError):
        conform_frames(frames, 0)


@pytest.mark.parametrize("plate_fps,plate_frames", [(24.0, 12), (25.0, 10)])
def test_output_has_the_plates_length_and_audio(tmp_path, plate_fps, plate_frames):
    plate = stick_figure_plate(tmp_path / "plate.mp4", plate_frames, plate_fps, (64, 48), audio_hz=440.0)
    duration = plate_frames / plate_fps  # 0.5 s and 0.4 s
    n = plate_frame_count(plate, 30)
    assert n == int(duration * 30 + 1e-9)  # 15 and 12
    # a render that came out 3 frames long (clip padding), ramped so the kept frames can be checked
    rendered = np.stack([np.full((48, 64, 3), 10 * i, np.uint8) for i in range(n + 3)])
    out = write_with_plate(rendered, plate, tmp_path / "shot.mp4", 30, metadata={"title": "animate test"})
    info = video_info(out)
    assert info["frames"] == n and info["fps"] == 30.0
    back = read_video(out)
    assert abs(int(back[-1].mean()) - 10 * (n - 1)) <= 2  # trimmed at the end, not resampled
    assert has_audio(out)
    assert abs(audio_duration(out) - n / 30) < 0.025  # audio exactly as long as the picture (one AAC frame slack)
    assert read_mp4_metadata(out).get("title") == "animate test"
    # a short render is held on its last frame to the plate's length; the audio still covers it
    out2 = write_with_plate(rendered[: n - 4], plate, tmp_path / "short.mp4", 30)
    assert video_info(out2)["frames"] == n and abs(audio_duration(out2) - n / 30) < 0.025


def test_plate_without_audio_gives_a_silent_shot(tmp_path):
    plate = stick_figure_plate(tmp_path / "silent.mp4", 8, 24.0, (64, 48))
    assert not has_audio(plate)
    out = write_with_plate(np.zeros((10, 48, 64, 3), np.uint8), plate, tmp_path / "o.mp4", 30)
    assert video_info(out)["frames"] == 10 and not has_audio(out) and audio_duration(out) is None
    assert not list(tmp_path.glob(".mux-*")) and not list(tmp_path.glob(".*tmp*"))
