"""The launchers `--launcher` accepts, by name; each class is imported only when picked."""

from __future__ import annotations

import importlib

from temper.errors import TemperError
from temper.launch.base import Launcher

#: `--launcher` name -> its Launcher class ("module:Class", imported when picked).
LAUNCHERS: dict[str, str] = {
    "ray": "temper.launch.ray_launcher:RayLauncher",
    "torchrun": "temper.launch.torchrun:TorchrunLauncher",
    "inprocess": "temper.launch.inprocess:InProcessLauncher",
}

#: The launchers that join a running cluster, so take `--address`.
ADDRESS_LAUNCHERS = ("ray",)


def launcher_class(name: str) -> type[Launcher]:
    if name not in LAUNCHERS:
        raise TemperError(f"--launcher {name!r} is not known; accepted: {', '.join(LAUNCHERS)}")
    module, _, attr = LAUNCHERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_launcher(name: str, *, address: str | None = None) -> Launcher:
    if name in ADDRESS_LAUNCHERS:
        return launcher_class(name)(address=address)
    if address:
        raise TemperError(f"--address only applies to --launcher {', '.join(ADDRESS_LAUNCHERS)}, "
                          f"not --launcher {name}")
    return launcher_class(name)()


__all__ = ["ADDRESS_LAUNCHERS", "LAUNCHERS", "build_launcher", "launcher_class"]
