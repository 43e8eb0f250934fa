"""Devices: measurement agents register, are listed with their liveness, and are removed."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response

from api.deps import ServicesDep, only_known_query_parameters, quoted
from api.repeated_names import refuse_repeated_names
from api.schemas import (
    INVALID,
    UNAVAILABLE,
    Device,
    DeviceIn,
    DeviceList,
    DeviceRegistered,
    ErrorMessage,
)
from latency.device_registry import DeviceClassConflict

router = APIRouter(
    prefix="/v1/devices",
    tags=["devices"],
    responses={**INVALID, **UNAVAILABLE},
    dependencies=[Depends(only_known_query_parameters)],
)


async def _each_field_once(request: Request) -> None:
    """The body, read once already to validate it, gives each field once."""
    refuse_repeated_names(await request.body(), "the body")


@router.post(
    "",
    status_code=201,
    summary="Register a device",
    responses={
        422: {
            "model": ErrorMessage,
            "description": "An invalid field (a device class, a runtime agents do not support, "
            "text that is not one printable line): which, and what it accepts.",
        },
        409: {
            "model": ErrorMessage,
            "description": "The agents of its device class online time otherwise (another "
            "runtime, runtime version or number of threads): what they time with.",
        },
    },
)
def register_device(
    device: DeviceIn, services: ServicesDep, _: None = Depends(_each_field_once)
) -> DeviceRegistered:
    """Called by `archtree agent`: the answer holds the device's id and the Redis its agent
    serves measurement requests from."""
    try:
        record = services.registry.register(device.model_dump())
    except DeviceClassConflict as conflict:
        raise HTTPException(status_code=409, detail=str(conflict)) from None
    return DeviceRegistered(**record, redis_url=services.agent_redis_url())


@router.get("", summary="List devices and queue depths")
def list_devices(services: ServicesDep) -> DeviceList:
    """Every registered device (online while its heartbeats arrive), the measurement
    requests waiting per device class (each class with a device, or with requests waiting;
    a class whose devices were all deleted and that nobody waits for is not listed), and the
    jobs waiting for an agent of their class."""
    by_device = services.registry.measurement_stats()["by_device"]
    devices = [
        Device(**record, measurements=by_device.get(record["id"], 0))
        for record in services.registry.list()
    ]
    registered = {device.device_class for device in devices}
    depths = {name: services.registry.queue_depth(name) for name in services.registry.classes()}
    return DeviceList(
        devices=devices,
        queue_depth={name: depth for name, depth in depths.items() if depth or name in registered},
        jobs_waiting=services.jobs.waiting_for_device(),
    )


@router.delete(
    "/{device_id}",
    status_code=204,
    summary="Remove a device",
    responses={404: {"model": ErrorMessage, "description": "No device with this id."}},
)
def delete_device(
    services: ServicesDep,
    device_id: str = Path(description="The device's id.", examples=["9b2e41c0d7aa"]),
) -> Response:
    """Take the device out of service: its agent stops at its next heartbeat."""
    if not services.registry.delete(device_id):
        raise HTTPException(
            status_code=404, detail=f"no device {quoted(device_id)}: see GET /v1/devices"
        )
    return Response(status_code=204)
