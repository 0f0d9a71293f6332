"""The helpers that bound client-supplied text before it reaches logs and labels."""

from __future__ import annotations

from meshpilot.untrusted import truncate_untrusted, version_label


def test_short_text_is_kept_and_long_text_is_cut_with_its_length() -> None:
    assert truncate_untrusted("sidecar~10.0.0.1~a.ns~ns.svc.cluster.local") == (
        "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local"
    )
    cut = truncate_untrusted("x" * 50_000_000, limit=10)
    assert cut == "xxxxxxxxxx...(50000000 chars)"


def test_control_characters_are_escaped_so_a_record_stays_one_line() -> None:
    out = truncate_untrusted("a\nb\x1b[31m", limit=64)
    assert "\n" not in out and "\x1b" not in out
    assert out == "a\\nb\\x1b[31m"


def test_only_version_shaped_values_become_labels() -> None:
    for good in ("1.24.0", "1.25-dev", "1.24.0-beta.1", "1.22.3+build.7"):
        assert version_label(good) == good
    for bad in ("", "x" * 40, "1." + "1" * 40, "evil label", "1.2.3\n", None, 7):
        assert version_label(bad) == "unknown"
