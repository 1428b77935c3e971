"""``ctid prompts check`` / ``ctid prompts tts``, through the real CLI, and the lookup
rules of :mod:`ctid.ivr.prompts` (Asterisk's ``fileexists_core``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from ctid.ivr.prompts import MissingPrompt, PromptError, lookup_order, missing_prompts, prompt_text, tts

ROOT = Path(__file__).resolve().parent.parent
HAVE_TTS = shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctid", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


def _config(tmp_path: Path, *, absolute: Path | None = None) -> Path:
    """One flow: English prompts, then a ``language`` node to ``es``; ``absolute`` adds a
    prompt given as an absolute path."""
    closing = f', "{absolute}"' if absolute else ""
    path = tmp_path / "ctid.toml"
    path.write_text(f"""
[[tenants]]
id = "acme"

[flows.support-main]
tenant = "acme"
start = "welcome"

[flows.support-main.nodes.welcome]
type = "play"
prompts = ["welcome"]
next = "menu"

[flows.support-main.nodes.menu]
type = "menu"
prompts = ["welcome", "main-menu"]
choices = {{ "1" = "spanish", "2" = "bye" }}
on_fail = "bye"

[flows.support-main.nodes.spanish]
type = "language"
language = "es"
next = "hola"

[flows.support-main.nodes.hola]
type = "play"
prompts = ["custom/hola"]
next = "bye"

[flows.support-main.nodes.bye]
type = "hangup"
prompts = ["goodbye", "digits/1"{closing}]
""")
    return path


def _sounds(tmp_path: Path) -> Path:
    """Some prompts exist, in the three places Asterisk looks."""
    sounds = tmp_path / "sounds"
    for name in ("en/welcome.gsm",        # the language directory
                 "goodbye.wav",           # the old flat layout: any language
                 "en/digits/1.ulaw",      # en: the fallback for every language
                 "es/custom/hola.wav",    # Spanish only
                 "en/main-menu.mp3"):     # not a format Asterisk plays
        (sounds / name).parent.mkdir(parents=True, exist_ok=True)
        (sounds / name).write_bytes(b"\0" * 64)
    return sounds


def _missing_lines(stdout: str) -> set[str]:
    return {line for line in stdout.splitlines() if line.startswith("missing: ")}


def test_check_lists_each_missing_prompt_per_language_with_its_places(tmp_path: Path) -> None:
    absolute = tmp_path / "custom" / "closing"
    (absolute.parent / "es").mkdir(parents=True)
    (absolute.parent / "es" / "closing.WAV").write_bytes(b"\0")  # Asterisk's old layout: <dir>/<lang>/<file>
    result = _run_cli("prompts", "check", "-c", str(_config(tmp_path, absolute=absolute)),
                      "--sounds", str(_sounds(tmp_path)))
    assert result.returncode == 1, result.stderr
    assert _missing_lines(result.stdout) == {
        "missing: en/main-menu (used by support-main.menu)",
        "missing: es/main-menu (used by support-main.menu)",
        "missing: en/option-is-invalid (used by support-main.menu)",
        "missing: es/option-is-invalid (used by support-main.menu)",
        "missing: en/custom/hola (used by support-main.hola)",
        f"missing: {absolute} [en] (used by support-main.bye)",
    }
    assert result.stdout.splitlines()[-1] == f"6 missing (7 prompt(s) checked for en, es in {tmp_path / 'sounds'})"


def test_check_reports_every_place_a_prompt_is_used(tmp_path: Path) -> None:
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    result = _run_cli("prompts", "check", "-c", str(_config(tmp_path)), "--sounds", str(sounds))
    assert result.returncode == 1
    assert "missing: en/welcome (used by support-main.welcome, support-main.menu)" in result.stdout.splitlines()


def test_check_exits_0_when_every_prompt_plays(tmp_path: Path) -> None:
    sounds = _sounds(tmp_path)
    (sounds / "en" / "custom").mkdir()
    for name in ("main-menu.sln16", "option-is-invalid.g722", "custom/hola.alaw"):
        (sounds / "en" / name).write_bytes(b"\0")
    result = _run_cli("prompts", "check", "-c", str(_config(tmp_path)), "--sounds", str(sounds))
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [f"OK: none missing (6 prompt(s) checked for en, es in {sounds})"]


def test_language_option_adds_languages_and_a_dialect_falls_back_to_its_language(tmp_path: Path) -> None:
    sounds = _sounds(tmp_path)
    (sounds / "fr").mkdir()
    (sounds / "fr" / "main-menu.wav").write_bytes(b"\0")
    result = _run_cli("prompts", "check", "-c", str(_config(tmp_path)), "--sounds", str(sounds),
                      "--language", "fr_CA")
    lines = _missing_lines(result.stdout)
    assert "missing: fr_CA/option-is-invalid (used by support-main.menu)" in lines
    assert not any("fr_CA/main-menu" in line for line in lines)  # fr/main-menu.wav
    assert not any(line.startswith("missing: en/") for line in lines)  # --language replaces the default en
    assert "for es, fr_CA in" in result.stdout.splitlines()[-1]


def test_bad_config_is_reported_like_check_config(tmp_path: Path) -> None:
    bad = tmp_path / "ctid.toml"
    bad.write_text('[flows.x]\ntenant = "nobody"\nstart = "a"\n[flows.x.nodes.a]\ntype = "hangup"\n')
    (tmp_path / "sounds").mkdir()
    result = _run_cli("prompts", "check", "-c", str(bad), "--sounds", str(tmp_path / "sounds"))
    expected = _run_cli("check-config", "-c", str(bad))
    assert result.returncode == expected.returncode == 2
    assert result.stderr == expected.stderr and "unknown tenant 'nobody'" in result.stderr
    assert result.stdout == ""


def test_missing_sounds_dir_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    result = _run_cli("prompts", "check", "-c", config, "--sounds", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert f"--sounds {tmp_path / 'nowhere'}: no such directory" in result.stderr
    (tmp_path / "sounds").mkdir()
    result = _run_cli("prompts", "check", "-c", config, "--sounds", str(tmp_path / "sounds"), "--language", "../etc")
    assert result.returncode == 2 and "is not a language code" in result.stderr
    result = _run_cli("prompts", "tts", "-c", config, "--sounds", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "no such directory" in result.stderr
    texts = tmp_path / "texts.toml"
    texts.write_text("welcome = 3\n")
    result = _run_cli("prompts", "tts", "-c", config, "--sounds", str(tmp_path / "sounds"), "--texts", str(texts))
    assert result.returncode == 2 and "welcome: the text must be a non-empty string" in result.stderr


def test_tts_without_espeak_or_sox_names_the_debian_packages(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    result = _run_cli("prompts", "tts", "-c", str(_config(tmp_path)), "--sounds", str(_sounds(tmp_path)),
                      env={"PATH": str(tmp_path / "bin")})
    assert result.returncode == 1
    assert "not installed: apt-get install espeak-ng sox" in result.stderr
    assert not list((tmp_path / "sounds").rglob("*.part"))


@pytest.mark.skipif(not HAVE_TTS, reason="espeak-ng and sox are not installed (apt-get install espeak-ng sox; "
                                         "scripts/test.sh installs them)")
def test_tts_writes_8khz_mono_wavs_and_check_then_passes(tmp_path: Path) -> None:
    config, sounds = str(_config(tmp_path)), _sounds(tmp_path)
    texts = tmp_path / "texts.toml"
    texts.write_text('main-menu = "For Spanish press one"\n"custom/hola" = "-hola"\nunused = "x"\n')
    result = _run_cli("prompts", "tts", "-c", config, "--sounds", str(sounds), "--texts", str(texts))
    assert result.returncode == 0, result.stderr
    expected = {sounds / name for name in ("en/main-menu.wav", "es/main-menu.wav", "en/option-is-invalid.wav",
                                           "es/option-is-invalid.wav", "en/custom/hola.wav")}
    assert {Path(line.removeprefix("wrote: ")) for line in result.stdout.splitlines()
            if line.startswith("wrote: ")} == expected
    assert "5 file(s) written, 0 left missing" in result.stdout
    assert "'unused' is not a prompt of the flows" in result.stderr
    for path in expected:
        with wave.open(str(path)) as audio:
            assert (audio.getframerate(), audio.getnchannels(), audio.getsampwidth()) == (8000, 1, 2)
            assert audio.getnframes() > 800  # some speech, not an empty file
    assert not list(sounds.rglob("*.part"))
    result = _run_cli("prompts", "check", "-c", config, "--sounds", str(sounds))
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("OK: none missing")


def test_tts_skips_absolute_paths_and_says_so(tmp_path: Path) -> None:
    absolute = tmp_path / "custom" / "closing"
    sounds = _sounds(tmp_path)
    for name in ("main-menu.wav", "option-is-invalid.wav", "custom/hola.wav"):
        (sounds / "en" / name).parent.mkdir(parents=True, exist_ok=True)
        (sounds / "en" / name).write_bytes(b"\0")
    result = _run_cli("prompts", "tts", "-c", str(_config(tmp_path, absolute=absolute)), "--sounds", str(sounds))
    assert result.returncode == 1  # something is left missing
    assert f"skipped: {absolute} [en]: an absolute path" in result.stderr
    assert f"skipped: {absolute} [es]: an absolute path" in result.stderr
    assert "0 file(s) written, 2 left missing" in result.stdout
    assert not absolute.parent.exists()


def test_tts_refuses_to_write_outside_the_sounds_dir(tmp_path: Path) -> None:
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    for item in (MissingPrompt("../../escape", "en", ()), MissingPrompt("welcome", "../..", ())):
        with pytest.raises(PromptError, match="outside the sounds directory"):
            tts([item], sounds, {})
    (tmp_path / "elsewhere").mkdir()
    (sounds / "en").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PromptError, match="outside the sounds directory"):
        tts([MissingPrompt("welcome", "en", ())], sounds, {})
    assert not any((tmp_path / "elsewhere").iterdir())


def test_lookup_order_is_asterisks() -> None:
    assert lookup_order("welcome", "en") == ["en/welcome", "welcome"]
    assert lookup_order("digits/1", "fr_CA") == ["fr_CA/digits/1", "fr/digits/1", "digits/1", "en/digits/1"]
    assert lookup_order("welcome", "en_GB_female") == ["en_GB_female/welcome", "en_GB/welcome", "en/welcome",
                                                       "welcome"]
    assert lookup_order("welcome", "") == ["welcome", "en/welcome"]
    assert lookup_order("/srv/custom/welcome", "es") == ["/srv/custom/es/welcome", "/srv/custom/welcome",
                                                         "/srv/custom/en/welcome"]


def test_extensions_are_asterisks_and_case_matters(tmp_path: Path) -> None:
    used = {"a": [("f", "n")], "b": [("f", "n")], "c": [("f", "n"), ("f", "n")]}
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "a.WAV").write_bytes(b"\0")
    (tmp_path / "en" / "b.Wav").write_bytes(b"\0")
    (tmp_path / "en" / "c.mp3").write_bytes(b"\0")
    assert missing_prompts(used, tmp_path, ["en", "en"]) == [
        MissingPrompt("b", "en", (("f", "n"),)), MissingPrompt("c", "en", (("f", "n"),))]


def test_default_text_is_the_prompt_name_in_words() -> None:
    assert prompt_text("custom/press-1_for-sales") == "custom press 1 for sales"
