"""/v1/datasets/{dataset_id}/images/...: list stored images, thumbnails, relabel, delete.

(Adding images is `POST /v1/datasets/{dataset_id}/images` in the datasets router.)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.api.deps import PageDep, SessionDep, StorageDep, TenantDep
from app.api.responses import problem_responses
from app.schemas import ClassName, ImagePatch, ImagePublic
from app.services import images_catalog as svc

router = APIRouter(prefix="/v1/datasets/{dataset_id}/images", tags=["images"], responses=problem_responses())


@router.get("")
def list_images(
    dataset_id: str,
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
    label: Annotated[ClassName | None, Query(description="Only images of this class.")] = None,
) -> list[ImagePublic]:
    """List a dataset's images.

    Oldest first, `limit` per page from `offset`; with `label`, only that class (a class of the
    dataset, else 422). Each item links its thumbnail.
    """
    rows = svc.list_images(
        session=session, tenant=tenant, dataset_id=dataset_id, label=label,
        limit=page.limit, offset=page.offset,
    )  # fmt: skip
    return [svc.to_public(r) for r in rows]


@router.get(
    "/{image_id}/thumbnail",
    response_class=Response,
    responses={200: {"content": {svc.THUMBNAIL_MEDIA_TYPE: {}}, "description": "A JPEG thumbnail."}},
)
def get_thumbnail(
    dataset_id: str,
    image_id: str,
    session: SessionDep,
    tenant: TenantDep,
    storage: StorageDep,
    size: Annotated[svc.ThumbnailSize, Query(description="Longest side (px).")] = svc.ThumbnailSize.medium,
) -> Response:
    """Get a small JPEG of an image.

    The image fitted in `size` x `size` (aspect kept), made on first request and cached.
    """
    data = svc.thumbnail(
        session=session, storage=storage, tenant=tenant, dataset_id=dataset_id, image_id=image_id, size=size
    )
    return Response(
        data, media_type=svc.THUMBNAIL_MEDIA_TYPE, headers={"Cache-Control": "private, max-age=86400"}
    )


@router.patch("/{image_id}")
def relabel_image(
    dataset_id: str, image_id: str, body: ImagePatch, session: SessionDep, tenant: TenantDep
) -> ImagePublic:
    """Change an image's class.

    `label` must be one of the dataset's classes (422). Refused with 409 while a queued or
    running job trains on the dataset.
    """
    image = svc.relabel_image(
        session=session, tenant=tenant, dataset_id=dataset_id, image_id=image_id, label=body.label
    )
    return svc.to_public(image)


@router.delete("/{image_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_image(
    dataset_id: str, image_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep
) -> Response:
    """Delete an image from a dataset.

    The stored file is removed once no other dataset uses the same content. Refused with 409
    while a queued or running job trains on the dataset.
    """
    svc.delete_image(
        session=session, storage=storage, tenant=tenant, dataset_id=dataset_id, image_id=image_id
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
