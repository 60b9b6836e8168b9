"""Settings changed through the admin API: pins and upstreams, kept where
they survive a restart (JSON files beside the cache on a single node, the
shared database on a cluster: :mod:`~..cluster.settings`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs
from twisted.logger import Logger

from ..cache.keep import Keep
from ..cache.keep import Pin as EvictionPin
from ..config import PRESETS, Config, ConfigError, settings_of, upstream_from_settings
from ..reference import parse_image
from ..upstream.registry import Upstreams
from .backend import AdminError, Pin
from .jsonfile import load_json, save_json

log = Logger()

#: every setting that is (or leads to) an upstream's credentials
_CREDENTIALS = ("username", "password", "password_env", "password_file")
#: settings that name files or environment variables of the machine regproxy runs on
_LOCAL_REFERENCES = {"password_file", "password_env", "ca_file"}


class SavedUpstreamsStore(Protocol):
    """Where upstream changes made through the API are kept."""

    def load(self) -> dict[str, dict[str, Any] | None]: ...
    def put(self, name: str, settings: dict[str, Any] | None) -> None: ...


class SavedPinsStore(Protocol):
    """Where pins made through the API are kept."""

    def load(self) -> list[str]: ...
    def save(self, pins: list[str]) -> None: ...


class Pins:
    """Images eviction never removes: the config file's (``cache.pinned``)
    and those pinned through the API."""

    def __init__(self, configured: Sequence[str], saved: SavedPinsStore, keep: Keep) -> None:
        """*keep* gets every pin now and at each change."""
        self._configured = configured
        self._saved = saved
        self._keep = keep
        self.apply()

    def pins(self) -> list[Pin]:
        pins = [Pin(_normal(p), "config") for p in self._configured]
        return pins + [Pin(p, "api") for p in self._saved.load()]

    def pin(self, image: str) -> Pin:
        text = _given(image)
        saved = self._saved.load()
        if text not in saved and all(p.image != text for p in self.pins()):
            self._saved.save([*saved, text])
        self.apply()
        return Pin(text, "api" if text in self._saved.load() else "config")

    def unpin(self, image: str) -> None:
        text = _given(image)
        saved = self._saved.load()
        if text not in saved:
            if any(p.image == text for p in self.pins()):
                raise AdminError(409, f"{text} is pinned in the config file (cache.pinned)")
            raise AdminError(404, f"{text} is not pinned")
        self._saved.save([p for p in saved if p != text])
        self.apply()

    def apply(self) -> None:
        """Hand the pins to eviction again (they changed here, or on another node)."""
        self._keep.pins = [_as_pin(p.image) for p in self.pins()]


class UpstreamSettings:
    """The upstreams as the API shows and changes them; changes apply to
    the next request and are saved."""

    def __init__(self, config: Config, upstreams: Upstreams, saved: SavedUpstreamsStore) -> None:
        """*config*: as loaded, to validate a change against (fallbacks, aliases)."""
        self._config = config
        self._upstreams = upstreams
        self._saved = saved

    def upstreams(self) -> dict[str, dict[str, Any]]:
        return {name: self._view(name) for name in sorted(self._upstreams.configs)}

    def _view(self, name: str) -> dict[str, Any]:
        config = self._upstreams.configs[name]
        return {
            **settings_of(config),
            "preset": name in PRESETS,
            "default": name == self._upstreams.default,
        }

    def set_upstream(
        self, name: str, settings: dict[str, Any], merge: bool = False
    ) -> dict[str, Any]:
        current = self._upstreams.configs.get(name)
        if merge and current is None:
            raise AdminError(404, f"unknown upstream {name!r}: PUT it to add it")
        local = sorted(set(settings) & _LOCAL_REFERENCES)
        if local:
            # they would let an API caller read the daemon's files and environment
            raise AdminError(
                400,
                f"{', '.join(local)} can be set in the config file only; "
                "through the API give the password itself",
            )
        if merge and current is not None and "url" in settings and settings["url"] != current.url:
            # credentials stay with the host they were given for: the new one
            # gets only those this request gives again
            settings = {**dict.fromkeys(_CREDENTIALS), **settings}
        if merge:
            given = {**settings_of(current, redact=False), **settings}  # type: ignore[arg-type]
            given = {k: v for k, v in given.items() if v is not None}
        else:
            given = dict(settings)
        try:
            upstream = upstream_from_settings(name, given)
            configs = {**self._upstreams.configs, name: upstream}
            attrs.evolve(self._config, upstreams=configs)  # cross-checks fallbacks, aliases
        except ConfigError as e:
            raise AdminError(400, str(e)) from None
        except ValueError as e:
            raise AdminError(400, str(e)) from None
        self._upstreams.update(configs, self._upstreams.default)
        self._saved.put(name, settings_of(upstream, redact=False))
        log.info("upstream {name} set through the admin API", name=name)
        return self._view(name)

    def remove_upstream(self, name: str) -> None:
        if name not in self._upstreams.configs:
            raise AdminError(404, f"unknown upstream {name!r}")
        if name == self._upstreams.default:
            raise AdminError(409, f"{name!r} is the default upstream")
        users = [n for n, c in self._upstreams.configs.items() if name in c.fallbacks]
        if users:
            raise AdminError(409, f"{name!r} is a fallback of {', '.join(users)}")
        if name in PRESETS:
            raise AdminError(409, f"{name!r} is built in; PUT it to change it")
        configs = {n: c for n, c in self._upstreams.configs.items() if n != name}
        self._upstreams.update(configs, self._upstreams.default)
        self._saved.put(name, None)
        log.info("upstream {name} removed through the admin API", name=name)

    def reload(self) -> None:
        """Apply the saved upstreams again (another node of a cluster changed them)."""
        configs = apply_upstreams(self._config, self._saved.load()).upstreams
        if dict(configs) != dict(self._upstreams.configs):
            self._upstreams.update(configs, self._upstreams.default)
            log.info("upstreams changed by another node applied")


def _normal(image: str) -> str:
    """An image reference as users type it, in its one normal form."""
    return str(parse_image(image))


def _given(image: str) -> str:
    """*image* as given through the API, normalised; AdminError(400) if it is none."""
    try:
        return _normal(image)
    except ValueError as e:
        raise AdminError(400, str(e)) from None


def _as_pin(image: str) -> EvictionPin:
    parsed = parse_image(image)
    return (parsed.upstream, parsed.repository, parsed.tag, parsed.digest)


class SavedPins:
    """Pins added through the admin API, in a JSON list beside the cache."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> list[str]:
        data = load_json(self.path)
        return [p for p in data if isinstance(p, str)] if isinstance(data, list) else []

    def save(self, pins: list[str]) -> None:
        save_json(self.path, pins)


class SavedUpstreams:
    """Upstream changes made through the admin API, in a JSON file beside
    the cache (mode 0600: it may hold passwords), so they survive restarts."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, Any] | None]:
        data = load_json(self.path)
        return data if isinstance(data, dict) else {}

    def put(self, name: str, settings: dict[str, Any] | None) -> None:
        data = self.load()
        data[name] = settings
        save_json(self.path, data)

    def apply(self, config: Config) -> Config:
        """*config* with the changes saved here (at start-up: tap.py)."""
        return apply_upstreams(config, self.load())


def apply_upstreams(config: Config, saved: dict[str, dict[str, Any] | None]) -> Config:
    """*config* with the *saved* changes on top; a saved entry that no
    longer validates is logged and skipped."""
    configs = dict(config.upstreams)
    for name, settings in saved.items():
        if settings is None:
            configs.pop(name, None)
            continue
        try:
            configs[name] = upstream_from_settings(name, settings)
        except ConfigError as e:
            log.error("ignoring saved upstream {name}: {why}", name=name, why=e)
    try:
        return attrs.evolve(config, upstreams=configs)
    except ValueError as e:
        log.error("ignoring saved upstream changes: {why}", why=e)
        return config
