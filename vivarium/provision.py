"""What a sandbox starts from: its image (built or found) and the ready template of its shape (found or
made once), and mending a running sandbox whose gateway was killed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from vivarium import cgroup, record, state
from vivarium import config as cfg
from vivarium import template as template_mod
from vivarium.errors import InstanceError
from vivarium.image.build import Image, build_image, find_image
from vivarium.image.recipe import Recipe
from vivarium.net import control as fence
from vivarium.progress import Progress
from vivarium.vm import accel as accel_mod
from vivarium.vm import caps
from vivarium.vm.qemu import HOTPLUG_SLOTS


def image_of(d: state.InstanceDir, c: cfg.Config, progress: Progress) -> Image:
    """An existing sandbox's own image (which must still be cached); for a new one, the image of its settings, built if need be."""
    if d.exists():
        key = d.read().instance.image
        image = find_image(key)
        if image is None:
            raise InstanceError(
                f"the image of sandbox {d.name!r} ({key}) is gone from the cache",
                hint=f"`vivarium reset {d.name}` rebuilds it from the current settings",
            )
        return image
    image, _ = build_image(Recipe.from_config(c), progress=progress)
    return image


def check_image(d: state.InstanceDir, made: record.Instance, image: Image) -> None:
    if made.build_id != image.build_id:
        raise InstanceError(
            f"sandbox {d.name!r} was made from an image that has since been rebuilt",
            hint=f"`vivarium reset {d.name}` starts it afresh from the new image",
        )


def template_for(c: cfg.Config, image: Image, fenced: bool, progress: Progress,
                 sandbox: Callable[[str, cfg.Config], template_mod.Throwaway]) -> template_mod.Template | None:  # fmt: skip
    """The ready template for a new sandbox of this shape, made now (in a throwaway `sandbox`) if missing;
    None where none can serve."""
    if len(c.share) > HOTPLUG_SLOTS or not fenced:
        return None
    acc, qemu = accel_mod.choose(image.kernel), caps.probe()
    return template_mod.find(image, c, acc.name, qemu) or template_mod.make(image, c, acc.name, qemu, progress, sandbox)


def unstarted_template(d: state.InstanceDir, made: record.Instance) -> template_mod.Template | None:
    """The template whose disks this sandbox's overlays were made on, while it has not yet started from it."""
    if not made.template or not made.pristine:
        return None
    tpl = template_mod.get(made.template)
    if tpl is None:
        raise InstanceError(f"the template sandbox {d.name!r} was to start from is gone from the cache",
                            hint=f"`vivarium reset {d.name}` starts it afresh")  # fmt: skip
    return tpl


def mend(d: state.InstanceDir, run: record.Run | None, progress: Progress) -> None:
    """A running sandbox whose gateway is gone (killed from outside) has been failing closed: bring it back."""
    if run is not None and run.network != "unfenced" and fence.pid(d.path) is None:
        progress("start", "restarting the egress gateway")
        group = cgroup.of(d.name, d.path)
        with contextlib.ExitStack() as joined:
            if group is not None:  # the sandbox's, like the first (if this process may join it)
                with contextlib.suppress(cgroup.Unavailable):
                    joined.enter_context(group.joined())
            fence.start(d.path, d.pidfile)
