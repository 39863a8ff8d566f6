"""The checks a request passes before any model loads or GPU is reserved — shared by `wanrender generate` and the
farm — and the `wanrender verify` command."""
from __future__ import annotations

import argparse
import sys
from renderer.delivery import DeliverySettings
from renderer.safety import load_terms, screen_prompt


def prompt_problems(prompt: str, delivery: DeliverySettings, lists=None) -> list[tuple[str, str]]:
    """(field, message) for every blocked term in the (composed) prompt; [] when screening is off."""
    if not delivery.safety.prompt_screen:
        return []
    lists = lists if lists is not None else load_terms(delivery.safety.terms_dir)
    return [("prompt", m.message()) for m in screen_prompt(prompt, lists)]


def image_problems(images: list[tuple[str, str]], delivery: DeliverySettings, screen=None) -> list[tuple[str, str]]:
    """(key, message) for every conditioning image the output screen's detector flags; `images` holds (key, path)
    pairs (key: the shot id for the farm). Loads the detector only when there is an image to look at."""
    from renderer.safety import OutputScreen, image_problem

    images = [(k, p) for k, p in images if p]
    if not images or not delivery.safety.output_screen:
        return []
    screen = screen or OutputScreen.from_settings(delivery.safety)
    return [(k, msg) for k, p in images if (msg := image_problem(p, screen)) is not None]


def gate_problems(settings) -> list[tuple[str, str]]:
    """One shot (renderer.settings.Settings): (field, message) for the label, signing and safety settings, the
    composed prompt against the term lists and the conditioning image against the detector."""
    delivery = settings.delivery
    problems = delivery.problems(labelled=bool(settings.label))
    if not any(f == "safety.terms_dir" for f, _ in problems):
        problems += prompt_problems(settings.shot.prompt, delivery)
    if not any(f.startswith("safety.") for f, _ in problems):
        problems += [("image", m) for _, m in image_problems([("image", settings.shot.image)], delivery)]
    return problems


def cmd_verify(argv: list[str]) -> int:
    """wanrender verify FILE [FILE ...] [--trust ROOT.pem]: exit 0 when every file's signature and content hash
    are valid (and, with --trust, its certificate chains to the root), 1 otherwise, 2 for bad arguments."""
    from renderer.media_provenance import verify_mp4

    ap = argparse.ArgumentParser(prog="wanrender verify", description=cmd_verify.__doc__)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--trust", help="PEM root certificate(s) of the studio; without it the chain is not judged")
    ap.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    ok = True
    results = []
    for f in args.files:
        try:
            v = verify_mp4(f, trust=args.trust)
        except (OSError, ValueError) as e:  # a missing file, an unreadable or non-PEM --trust
            print(f"error: {e}", file=sys.stderr)
            return 2
        ok = ok and v.ok
        results.append(v)
        if not args.json:
            print("\n".join(v.lines()))
            print(f"  => {'OK' if v.ok else 'FAILED'}")
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps([{**asdict(v), "ok": v.ok} for v in results], ensure_ascii=False, indent=2))
    return 0 if ok else 1
