"""Ask the container engine which image each compose service's container runs.

Used before and after an update to tell whether it took effect. The engine is the one the
compose command drives (podman for `podman compose`/podman-compose, docker for docker
compose); containers are found by the compose project label.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from stackd.core.updates import ServiceImage

__all__ = ["EngineImages", "engine_for", "service_images"]

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
QUERY_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class EngineImages:
    """The engine's answer; `error` set (and no images) when it could not be asked."""

    images: tuple[ServiceImage, ...] = ()
    error: str | None = None


def engine_for(compose_command: Sequence[str]) -> str | None:
    """`podman` or `docker`, from the compose command's first word; None if it names neither."""
    word = os.path.basename(compose_command[0]) if compose_command else ""
    if word.startswith("podman"):
        return "podman"
    if word.startswith("docker"):
        return "docker"
    return None


def _parse_podman(payload: str) -> list[ServiceImage]:
    out = []
    for entry in json.loads(payload or "[]"):
        labels = entry.get("Labels") or {}
        names = entry.get("Names") or [entry.get("Id", "")[:12]]
        out.append(
            ServiceImage(
                service=str(labels.get(SERVICE_LABEL, "")),
                container=str(names[0]),
                image_id=str(entry.get("ImageID", "")),
                image_name=str(entry.get("Image", "")),
            )
        )
    return out


def _parse_docker(payload: str) -> list[ServiceImage]:
    out = []
    for line in payload.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        labels = dict(
            item.split("=", 1) for item in str(entry.get("Labels", "")).split(",") if "=" in item
        )
        out.append(
            ServiceImage(
                service=labels.get(SERVICE_LABEL, ""),
                container=str(entry.get("Names", "")),
                image_id=str(entry.get("ID", "")),
                image_name=str(entry.get("Image", "")),
            )
        )
    return out


async def service_images(engine: str | None, project: str) -> EngineImages:
    """Running containers of a compose project and their images (a typed result, never raises)."""
    if engine is None:
        return EngineImages(error="no known container engine behind the compose command")
    argv = [engine, "ps", "--filter", f"label={PROJECT_LABEL}={project}", "--format"]
    argv.append("json" if engine == "podman" else "{{json .}}")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return EngineImages(error=f"cannot run {engine}: {exc.strerror}")
    try:
        out, err = await asyncio.wait_for(proc.communicate(), QUERY_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return EngineImages(error=f"`{engine} ps` did not answer within {QUERY_TIMEOUT_S:.0f}s")
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip().splitlines()
        return EngineImages(
            error=f"`{engine} ps` exited {proc.returncode}: {text[-1] if text else ''}"
        )
    try:
        images = _parse_podman(out.decode()) if engine == "podman" else _parse_docker(out.decode())
    except (ValueError, AttributeError) as exc:
        return EngineImages(error=f"`{engine} ps` gave output stackd cannot read: {exc}")
    # Docker reports short image ids in `ps`; that is enough to tell old from new.
    return EngineImages(images=tuple(sorted(images, key=lambda i: (i.service, i.container))))
