"""Test detectors for the content-safety gate (safety.detector=tests.safety_helpers:<factory>)."""


def flag_everything():
    """A detector that reports an exposed-breast detection with score 0.93 on every frame it sees."""
    def detect(frame):
        h, w = frame.shape[:2]
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.93, "box": [0, 0, w, h]},
                {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 4, 4]}]
    detect.name = "test-flag-everything"
    return detect


def flag_weakly():
    """Reports a flagged class below the default threshold (0.5): must not hold the shot."""
    def detect(frame):
        return [{"class": "BUTTOCKS_EXPOSED", "score": 0.3, "box": [0, 0, 2, 2]}]
    return detect
