"""The flows' prompt files: which ones Asterisk would not find, and text-to-speech for them.

A prompt is an Asterisk sound file name without extension (``welcome``, ``digits/1``) or
an absolute path (``/var/lib/asterisk/sounds/custom/welcome``). :func:`missing_prompts`
looks each one up the way Asterisk does when it plays a file (``main/file.c``,
``fileexists_core`` and ``fileexists_test``, with ``asterisk.conf``'s default
``languageprefix = yes``), for each language a call can have:

1. the channel language, then that language cut at its last ``_`` until nothing is left:
   ``fr_CA`` tries ``fr_CA`` then ``fr``; ``en_GB_female`` tries ``en_GB_female``,
   ``en_GB``, ``en``;
2. no language at all (the old flat layout);
3. the default language ``en``, unless step 1 tried it already.

So ``welcome`` played with language ``fr_CA`` is found as ``<sounds>/fr_CA/welcome.*``,
``<sounds>/fr/welcome.*``, ``<sounds>/welcome.*`` or ``<sounds>/en/welcome.*``, the first
that exists. The last step means any language plays the English file when it has none
of its own: the check says whether every prompt *plays*, not whether it is translated.

A relative name takes the language as a leading directory (``<sounds>/fr/digits/1``).
An absolute path takes it just before the file name, as Asterisk's old layout does:
``/srv/custom/welcome`` in ``fr`` tries ``/srv/custom/fr/welcome``, then
``/srv/custom/welcome``, then ``/srv/custom/en/welcome``; the ``sounds`` directory plays
no part.

A candidate matches when a file with one of :data:`SOUND_EXTENSIONS` exists, the
extensions of the audio formats Asterisk's own format modules read (case matters:
``WAV`` is GSM in a WAV container, ``wav`` is linear PCM). MP3 is not among them: it
needs the separate ``format_mp3`` add-on.

:func:`tts` fills the gaps with espeak-ng and sox: an 8 kHz mono 16-bit WAV at
``<sounds>/<language>/<name>.wav``, a stand-in until the real recording exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from ctid.ivr.model import FlowConfig, LanguageNode

__all__ = [
    "DEFAULT_LANGUAGE",
    "SOUND_EXTENSIONS",
    "MissingPrompt",
    "PromptError",
    "check_language",
    "default_voice",
    "flow_languages",
    "load_texts",
    "lookup_order",
    "missing_prompts",
    "prompt_text",
    "tts",
]

DEFAULT_LANGUAGE: Final = "en"
"""Asterisk's ``DEFAULT_LANGUAGE``: the last language every lookup tries."""

SOUND_EXTENSIONS: Final = (
    "wav", "wav16",                          # format_wav: 8 and 16 kHz linear PCM
    "WAV", "wav49",                          # format_wav_gsm: GSM in a WAV container
    "gsm",                                   # format_gsm
    "ulaw", "ul", "mu", "ulw", "pcm",        # format_pcm: mu-law
    "alaw", "al", "alw",                     # format_pcm: A-law
    "au", "g722",                            # format_pcm
    "sln", "raw", "sln12", "sln16", "sln24", "sln32", "sln44", "sln48", "sln96", "sln192",
    "g719", "g723", "g723sf", "g726-40", "g726-32", "g726-24", "g726-16", "g729",
    "ilbc", "vox", "siren7", "siren14",
    "ogg", "spx", "opus",                    # format_ogg_vorbis, format_ogg_speex, format_ogg_opus
)
"""File extensions Asterisk plays natively (audio formats only; no ``mp3``)."""

_LANGUAGE_RE: Final = re.compile(r"[A-Za-z]{2,8}(_[A-Za-z0-9]{1,16}){0,3}")

TTS_PACKAGES: Final = "espeak-ng sox"
"""The Debian packages :func:`tts` needs."""

TOOL_TIMEOUT_S: Final = 60.0
"""Per espeak-ng or sox run: a prompt is a sentence, not a book."""


class PromptError(Exception):
    """A prompt file cannot be generated (tool missing or failing, unsafe target)."""


@dataclass(frozen=True)
class MissingPrompt:
    """A prompt that no file matches for one language, and the places that play it."""

    prompt: str
    language: str
    places: tuple[tuple[str, str], ...]
    """``(flow, node)`` pairs, in config order, without repeats."""

    @property
    def absolute(self) -> bool:
        return self.prompt.startswith("/")

    def __str__(self) -> str:
        """``en/welcome``, or ``/srv/custom/welcome [en]`` for an absolute path."""
        return f"{self.prompt} [{self.language}]" if self.absolute else f"{self.language}/{self.prompt}"


def check_language(value: str) -> str:
    """``value`` if it is an Asterisk language code (``en``, ``fr_CA``, ``en_GB_female``);
    it becomes a directory name, so nothing else passes."""
    if not _LANGUAGE_RE.fullmatch(value):
        raise PromptError(f"{value!r} is not a language code like en, fr_CA or en_GB_female")
    return value


def lookup_order(prompt: str, language: str) -> list[str]:
    """The names Asterisk tries for ``prompt`` in ``language``, first to last, without
    extension; relative ones are relative to the sounds directory."""
    languages: list[str | None] = []
    lang = language
    while lang:
        languages.append(lang)
        lang = lang.rpartition("_")[0]
    languages.append(None)
    if DEFAULT_LANGUAGE not in languages:
        languages.append(DEFAULT_LANGUAGE)
    path = PurePosixPath(prompt)
    if path.is_absolute():
        return [str(path if lang is None else path.parent / lang / path.name) for lang in languages]
    return [prompt if lang is None else f"{lang}/{prompt}" for lang in languages]


def _exists(base: Path) -> bool:
    return any(base.with_name(f"{base.name}.{ext}").is_file() for ext in SOUND_EXTENSIONS)


def missing_prompts(used: Mapping[str, list[tuple[str, str]]], sounds_dir: Path,
                    languages: Iterable[str]) -> list[MissingPrompt]:
    """The ``(prompt, language)`` pairs no file matches, by language then in ``used``
    order. ``used`` is :func:`ctid.ivr.model.flow_prompts`; ``languages`` are those a
    call can have (see :func:`flow_languages`)."""
    missing: list[MissingPrompt] = []
    for language in dict.fromkeys(languages):
        for prompt, places in used.items():
            if not any(_exists(sounds_dir / name) for name in lookup_order(prompt, language)):
                missing.append(MissingPrompt(prompt, language, tuple(dict.fromkeys(places))))
    return missing


def flow_languages(flows: Mapping[str, FlowConfig]) -> set[str]:
    """Every language the flows set: each flow's ``language`` and each ``language`` node's."""
    languages = {flow.language for flow in flows.values() if flow.language}
    languages |= {node.language for flow in flows.values() for node in flow.nodes.values()
                  if isinstance(node, LanguageNode)}
    return languages


def prompt_text(prompt: str) -> str:
    """What TTS says for a prompt with no text given: its name, ``-`` ``_`` ``/`` as spaces."""
    return " ".join(prompt.replace("-", " ").replace("_", " ").replace("/", " ").split())


def load_texts(path: Path) -> dict[str, str]:
    """Prompt texts for :func:`tts` from a TOML file of ``name = "text"`` lines (quote a
    name with ``/``: ``"digits/1" = "one"``)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise PromptError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PromptError(f"{path}: {exc}") from None
    texts: dict[str, str] = {}
    for name, text in data.items():
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"{path}: {name}: the text must be a non-empty string "
                              '(quote names with / or .: "digits/1" = "one")')
        texts[name] = text
    return texts


def default_voice(language: str) -> str:
    """The espeak-ng voice for an Asterisk language: ``pt_BR`` -> ``pt-br``. espeak-ng
    picks the nearest voice it has (``fr-ca`` speaks French)."""
    return language.lower().replace("_", "-")


def _target(sounds_root: Path, language: str, prompt: str) -> Path:
    target = (sounds_root / language / f"{prompt}.wav").resolve()
    if not target.is_relative_to(sounds_root):
        raise PromptError(f"refusing to write {target}: outside the sounds directory {sounds_root}")
    return target


def _run(command: list[str]) -> None:
    try:
        subprocess.run(command, check=True, timeout=TOOL_TIMEOUT_S, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise PromptError(f"{command[0]} failed (exit {exc.returncode})"
                          f"{': ' + detail[-1] if detail else ''}") from None
    except subprocess.TimeoutExpired:
        raise PromptError(f"{command[0]} did not finish within {TOOL_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise PromptError(f"cannot run {command[0]}: {exc}") from None


def _tools() -> tuple[str, str]:
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    if espeak is None or sox is None:
        absent = " and ".join(name for name, path in (("espeak-ng", espeak), ("sox", sox)) if path is None)
        raise PromptError(f"{absent} not installed: apt-get install {TTS_PACKAGES}")
    return espeak, sox


def tts(missing: Sequence[MissingPrompt], sounds_dir: Path, texts: Mapping[str, str], *,
        voice_for: Callable[[str], str] | None = None,
        on_skip: Callable[[MissingPrompt, str], None] | None = None) -> list[Path]:
    """Speak each missing prompt into ``<sounds_dir>/<language>/<prompt>.wav`` (8 kHz,
    mono, 16-bit signed PCM) and return the files written, in ``missing`` order.

    The text is ``texts[prompt]``, else :func:`prompt_text`; the voice is
    ``voice_for(language)`` (default :func:`default_voice`). Absolute-path prompts are
    not generated: ``on_skip(prompt, reason)`` is called for each. Each file appears
    whole (written beside it, then renamed), so Asterisk never plays half a file.

    Raises :class:`PromptError` if espeak-ng or sox is not installed or fails, or a
    target would fall outside ``sounds_dir``; files written before that stay.
    """
    voice_for = voice_for or default_voice
    todo: list[MissingPrompt] = []
    for item in missing:
        if item.absolute:
            if on_skip is not None:
                on_skip(item, "an absolute path, outside the sounds directory: record it or copy a file there")
        else:
            todo.append(item)
    if not todo:
        return []
    sounds_root = sounds_dir.resolve()
    targets = [_target(sounds_root, item.language, item.prompt) for item in todo]  # all, before any work
    espeak, sox = _tools()
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="ctid-tts-") as tmp:
        spoken = Path(tmp) / "spoken.wav"
        for item, target in zip(todo, targets, strict=True):
            text = texts.get(item.prompt) or prompt_text(item.prompt)
            # "--": a text starting with '-' is words to say, not an option.
            _run([espeak, "-v", voice_for(item.language), "-w", str(spoken), "--", text])
            if not spoken.is_file():
                raise PromptError(f"espeak-ng wrote no audio for {item}")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.part")
            try:
                _run([sox, str(spoken), "-t", "wav", "-r", "8000", "-c", "1", "-b", "16",
                      "-e", "signed-integer", str(partial)])
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            spoken.unlink()
            written.append(target)
    return written
