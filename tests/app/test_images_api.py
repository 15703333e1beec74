"""Stored images of a dataset: listing (paged, by class), thumbnails, relabel, delete, isolation."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from app.core.config import Settings


def _stored_files(settings: Settings) -> list[Path]:
    root = settings.storage_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _images(api, dataset_id: str, query: str = "") -> list[dict]:
    r = api.client.get(f"/v1/datasets/{dataset_id}/images{query}", headers=api.headers)
    assert r.status_code == 200, r.text
    return list(r.json())


def _three(api) -> tuple[dict, list[str]]:
    """A dataset with two cats and one dog; the image ids in upload order."""
    ds = api.dataset()
    cats = api.upload(ds["id"], "cat", api.image((200, 0, 0)), api.image((190, 0, 0), size=(40, 20)))
    dog = api.upload(ds["id"], "dog", api.image((0, 0, 200)))
    ids = [a["image_id"] for a in cats.json()["added"]] + [a["image_id"] for a in dog.json()["added"]]
    return ds, ids


def test_list_images_paged_and_by_label(api) -> None:
    ds, ids = _three(api)
    items = _images(api, ds["id"])
    assert sorted(i["image_id"] for i in items) == sorted(ids)
    by_id = {i["image_id"]: i for i in items}
    wide = by_id[ids[1]]
    assert (wide["width"], wide["height"], wide["label"]) == (40, 20, "cat")
    assert wide["filename"] == "img1.png" and wide["created_at"]
    assert wide["thumbnail_url"] == f"/v1/datasets/{ds['id']}/images/{ids[1]}/thumbnail"
    assert [i["image_id"] for i in _images(api, ds["id"], "?label=dog")] == [ids[2]]
    assert {i["image_id"] for i in _images(api, ds["id"], "?label=cat")} == set(ids[:2])
    # Pages are disjoint and cover the listing in the same order.
    pages = [_images(api, ds["id"], f"?limit=2&offset={o}") for o in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 1, 0]
    assert [i["image_id"] for p in pages for i in p] == [i["image_id"] for i in items]
    r = api.client.get(f"/v1/datasets/{ds['id']}/images?label=bird", headers=api.headers)
    assert "bird" in api.problem(r, 422)["detail"]


def test_thumbnail_is_a_small_jpeg_cached_once(api, settings: Settings) -> None:
    ds = api.dataset()
    big = api.image((10, 120, 30), size=(180, 90))
    [added] = api.upload(ds["id"], "cat", big).json()["added"]
    url = f"/v1/datasets/{ds['id']}/images/{added['image_id']}/thumbnail"
    r = api.client.get(url, headers=api.headers)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "JPEG" and im.size == (128, 64)
        r_, g, b = im.convert("RGB").getpixel((64, 32))
        assert g > 90 and r_ < 50 and b < 60  # the image's colour, not a placeholder
    key = hashlib.sha256(big).hexdigest()
    cached = settings.storage_dir / key[:2] / f"{key}.thumb-128.jpg"
    assert cached.read_bytes() == r.content
    # Served from the cache afterwards (the source is not read again).
    (settings.storage_dir / key[:2] / key).rename(cached.with_name("moved"))
    assert api.client.get(url, headers=api.headers).content == r.content
    small = api.client.get(url + "?size=64", headers=api.headers)
    assert small.status_code == 404  # source gone, size 64 not cached: a clear 404, not a 500
    api.problem(api.client.get(url + "?size=100000", headers=api.headers), 422)


def test_relabel_image(api) -> None:
    ds, ids = _three(api)
    url = f"/v1/datasets/{ds['id']}/images/{ids[0]}"
    r = api.client.patch(url, json={"label": "dog"}, headers=api.headers)
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "dog" and r.json()["image_id"] == ids[0]
    counts = api.client.get(f"/v1/datasets/{ds['id']}", headers=api.headers).json()["image_counts"]
    assert counts == {"cat": 1, "dog": 2}
    bad = api.client.patch(url, json={"label": "bird"}, headers=api.headers)
    assert "bird" in api.problem(bad, 422)["detail"]
    api.problem(api.client.patch(url, json={"label": "cat", "x": 1}, headers=api.headers), 422)
    api.problem(api.client.patch(url, json={}, headers=api.headers), 422)
    missing = f"/v1/datasets/{ds['id']}/images/nope"
    api.problem(api.client.patch(missing, json={"label": "cat"}, headers=api.headers), 404)


def test_delete_image_removes_unshared_file_only(api, settings: Settings) -> None:
    shared, own = api.image((5, 5, 5)), api.image((6, 6, 6))
    a, b = api.dataset(), api.dataset()
    ids = [x["image_id"] for x in api.upload(a["id"], "cat", shared, own).json()["added"]]
    assert api.upload(b["id"], "cat", shared).status_code == 201
    for image_id in ids:  # thumbnails exist for both, and go with their file
        thumb = api.client.get(f"/v1/datasets/{a['id']}/images/{image_id}/thumbnail", headers=api.headers)
        assert thumb.status_code == 200
    assert len(_stored_files(settings)) == 4
    for image_id in ids:
        r = api.client.delete(f"/v1/datasets/{a['id']}/images/{image_id}", headers=api.headers)
        assert r.status_code == 204, r.text
    names = {p.name for p in _stored_files(settings)}
    sha = hashlib.sha256(shared).hexdigest()
    assert names == {sha, f"{sha}.thumb-128.jpg"}  # still used by dataset b
    assert _images(api, a["id"]) == []
    assert len(_images(api, b["id"])) == 1
    r = api.client.delete(f"/v1/datasets/{a['id']}/images/{ids[0]}", headers=api.headers)
    api.problem(r, 404)


def test_changes_refused_while_a_job_trains(api) -> None:
    ds = api.ready_dataset()
    [image] = _images(api, ds["id"], "?label=cat")
    url = f"/v1/datasets/{ds['id']}/images/{image['image_id']}"
    job = api.job(ds["id"]).json()
    assert "cancel" in api.problem(api.client.delete(url, headers=api.headers), 409)["detail"]
    api.problem(api.client.patch(url, json={"label": "dog"}, headers=api.headers), 409)
    assert len(_images(api, ds["id"])) == 2  # reading is fine
    assert api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers).status_code == 202
    assert api.client.patch(url, json={"label": "dog"}, headers=api.headers).status_code == 200
    assert api.client.delete(url, headers=api.headers).status_code == 204


def test_other_tenants_images_are_404(api, make_key) -> None:
    ds, ids = _three(api)
    other = make_key("globex")
    base = f"/v1/datasets/{ds['id']}/images"
    api.problem(api.client.get(base, headers=other), 404)
    api.problem(api.client.get(f"{base}/{ids[0]}/thumbnail", headers=other), 404)
    api.problem(api.client.patch(f"{base}/{ids[0]}", json={"label": "dog"}, headers=other), 404)
    api.problem(api.client.delete(f"{base}/{ids[0]}", headers=other), 404)
    # An image id of another dataset (even the tenant's own) is not found under this one.
    own = api.dataset()
    elsewhere = f"/v1/datasets/{own['id']}/images/{ids[0]}/thumbnail"
    api.problem(api.client.get(elsewhere, headers=api.headers), 404)
    assert len(_images(api, ds["id"])) == 3
    api.problem(api.client.get(base), 401)


def _frame(colour: int) -> Image.Image:
    return Image.new("P", (64, 32), colour)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "size", "expected"),
    [
        (_encoded(Image.new("RGBA", (300, 100), (255, 0, 0, 128)), "PNG"), 128, (128, 43)),
        (_encoded(Image.new("L", (50, 80), 128), "PNG"), 64, (40, 64)),
        (_encoded(Image.new("L", (50, 80), 128), "PNG"), 256, (50, 80)),  # never enlarged
        (_encoded(Image.new("I;16", (40, 40), 30000), "PNG"), 64, (40, 40)),
        (_encoded(Image.new("CMYK", (600, 300)), "JPEG"), 128, (128, 64)),
        (_encoded(Image.new("RGB", (2000, 1000), (0, 200, 0)), "JPEG"), 256, (256, 128)),
        (_encoded(_frame(0), "GIF", save_all=True, append_images=[_frame(3)]),
         64, (64, 32)),
        (_encoded(Image.new("1", (64, 32)), "BMP"), 64, (64, 32)),
    ],
    ids=["rgba", "grey", "grey-small", "16bit", "cmyk", "big-jpeg", "animated-gif", "1bit-bmp"],
)
def test_thumbnails_of_every_mode_are_rgb_jpegs(data: bytes, size: int, expected: tuple[int, int]) -> None:
    from app.services.images_catalog import render_thumbnail

    with Image.open(io.BytesIO(render_thumbnail(data, size))) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", expected)
