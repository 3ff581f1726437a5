"""``pinsearch serve``: a warm query process speaking JSON lines on stdin/stdout.

Loading a store, its index, the metadata and a model takes seconds; a query then takes
milliseconds. ``serve`` pays the first once: it opens the store read-only, keeps the searcher
(with an in-memory columnar copy of the metadata) and answers one JSON request per line:

    {"id": 1, "pin": "1031", "k": 10, "category": "food_drink"}
    {"id": 2, "image": "photo.jpg", "k": 5}
    {"id": 3, "text": "red vintage cars", "k": 20, "mode": "fused", "alpha": 0.5}
    {"id": 4, "text": "cozy reading nook", "boards": true, "k": 10, "per_board": 3}
    {"id": 5, "pin": "1031", "titles": ["a cosy nook", "a race car"]}

Each answer is one line: the result's JSON (as ``pinsearch query --json`` prints it) plus the
request's ``id`` and ``ms`` (time to answer); a bad request gets ``{"id", "error"}`` and the
process goes on. The first line written is ``{"ready": true, ...}``. It reads a store; it
opens no network port (a web server for browsing comes in a later milestone, bound to
127.0.0.1 by default).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from pinsearch.errors import PinsearchError
from pinsearch.search import PinSearcher
from pinsearch.store import Store

__all__ = ["answer", "serve"]

_FILTERS = ("board", "user", "category")
# request key -> the request it belongs to (None: any request)
_KEYS: dict[str, str | None] = {
    "id": None, "k": None, "pin": None, "image": None, "text": None, "titles": None,
    **dict.fromkeys(_FILTERS),
    "mode": "text", "alpha": "text", "boards": "text", "per_board": "boards",
    "board_score": "boards",
}  # fmt: skip


def _check_keys(request: dict[str, Any]) -> None:
    """Refuse keys the request would silently ignore: unknown ones (a typo like ``"kk"``)
    and options of another kind of request (``mode`` without ``text``)."""
    unknown = sorted(key for key in request if key not in _KEYS)
    if unknown:
        raise ValueError(
            f"unknown request key(s) {', '.join(map(repr, unknown))}; known: {', '.join(_KEYS)}"
        )
    if "boards" in request and not isinstance(request["boards"], bool):
        raise ValueError(f"'boards' must be true or false, got {request['boards']!r}")
    for key, needs in _KEYS.items():  # (an empty text is a text request: said empty later)
        if needs is not None and key in request and request.get(needs) in (None, False):
            raise ValueError(f"{key!r} applies to {needs!r} requests only")
    if "alpha" in request and request.get("mode") != "fused":
        raise ValueError("'alpha' weighs mode 'fused' only")
    if "titles" in request and request.get("text") is not None:
        raise ValueError("'titles' requests rank texts for a 'pin' or an 'image', not a 'text'")
    # keys the request's own kind has no use for
    unused = {"titles": (*_FILTERS, "k"), "boards": ("mode", "alpha", "board")}
    for kind, keys in unused.items():
        if (kind in request) if kind == "titles" else request.get(kind):  # titles: even []
            given = [key for key in keys if key in request]
            if given:
                raise ValueError(f"{kind!r} requests take no {', '.join(map(repr, given))}")


#: The most results one request may ask for (``k``, ``per_board``).
MAX_K = 10_000
#: The most texts one ``titles`` request may rank, and the longest each may be: a request
#: that held 20,000 kept a 2-core server from every other request for two minutes.
MAX_TITLES, MAX_TITLE_CHARS = 1_000, 10_000


def _count(request: dict[str, Any], key: str, default: int) -> int:
    """A whole number from 1 to :data:`MAX_K` (not a bool, a float or a string)."""
    value = request.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise ValueError(f"{key!r} must be a whole number from 1 to {MAX_K}, got {value!r}")
    return value


def _texts(request: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse a non-string value (a list, a number) for any of ``keys`` by name."""
    for key in keys:
        if request.get(key) is not None and not isinstance(request[key], str):
            raise ValueError(f"{key!r} must be a string, got {request[key]!r}")


def _decoded(raw: str | bytes) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the request is not UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is out of range")
    return value


def _alpha(request: dict[str, Any]) -> float:
    value = request.get("alpha", 0.5)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"'alpha' must be a number from 0 to 1, got {value!r}")
    return float(value)


def answer(searcher: PinSearcher, request: dict[str, Any]) -> dict[str, Any]:
    """The response to one request (see the module docstring).

    Raises:
        ValueError: a malformed request (the caller turns it into an error line).
    """
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    _check_keys(request)
    _texts(request, ("image", "text", "mode", "board_score", *_FILTERS))
    pin = request.get("pin")
    if pin is not None and (isinstance(pin, bool) or not isinstance(pin, (str, int))):
        raise ValueError(f"'pin' must be a pin id (a string or a whole number), got {pin!r}")
    k = _count(request, "k", 10)
    filters = {f: request[f] for f in _FILTERS if request.get(f) is not None}
    asked = [key for key in ("pin", "image", "text") if request.get(key) is not None]
    if len(asked) != 1:
        raise ValueError("give exactly one of pin, image or text")
    text_search = asked == ["text"] or "titles" in request
    if text_search and not hasattr(searcher, "search_text"):
        raise ValueError(
            getattr(searcher, "text_refusal", "")
            or f"index {searcher.index_name!r} cannot answer text (l2 or l1 metric)"
        )
    if "titles" in request:
        titles = request["titles"]
        if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
            raise ValueError("titles must be a list of strings")
        if len(titles) > MAX_TITLES or any(len(t) > MAX_TITLE_CHARS for t in titles):
            raise ValueError(
                f"titles holds {len(titles)} texts; at most {MAX_TITLES:,} of up to "
                f"{MAX_TITLE_CHARS:,} characters each per request"
            )
        image = None if request.get("image") is None else _image_path(request)
        return searcher.rank_texts(  # type: ignore[attr-defined, no-any-return]
            titles, pin_id=None if pin is None else str(pin), image=image
        ).to_dict()
    if "text" in asked:
        if request.get("boards"):
            return searcher.search_boards(  # type: ignore[attr-defined, no-any-return]
                request["text"], k, per_board=_count(request, "per_board", 3),
                score=str(request.get("board_score", "topm")), user=request.get("user"),
                category=request.get("category"),
            ).to_dict()  # fmt: skip
        return searcher.search_text(  # type: ignore[attr-defined, no-any-return]
            request["text"], k, mode=str(request.get("mode", "image")),
            alpha=_alpha(request), **filters,
        ).to_dict()  # fmt: skip
    if "pin" in asked:
        return searcher.similar_to_pin(str(request["pin"]), k, **filters).to_dict()
    return searcher.similar_to_image(_image_path(request), k, **filters).to_dict()


def _image_path(request: dict[str, Any]) -> Path:
    """A request's image: a file (an empty path, a folder or nothing there is refused)."""
    if not request["image"].strip():
        raise ValueError("'image' is empty; give the path of an image file")
    path = Path(request["image"])
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise ValueError(f"image {path} {what}")
    return path


def serve(
    store_path: str | Path,
    backbone: str | None = None,
    *,
    index: str | None = None,
    requests: IO[str] | IO[bytes] | None = None,
    responses: IO[str] | None = None,
    config: Any = None,
) -> int:
    """Answer JSON-line requests until the input ends; returns how many were answered.

    ``index``: which of the backbone's indexes answers (the default as for ``query``);
    ``config``: search-time settings of the index (an :class:`~pinsearch.indexes.IndexConfig`:
    nprobe, ef_search, precision, refine, device), as for :class:`PinSearcher`."""
    from pinsearch.textsearch import TextSearcher

    requests = requests if requests is not None else sys.stdin.buffer  # lines decoded one by one
    responses = responses or sys.stdout
    with Store.open(store_path, read_only=True, detach=True) as store:
        searcher: PinSearcher | None = None
        no_text = ""
        try:
            searcher = TextSearcher(
                store, backbone=backbone, index=index, config=config, cache_metadata=True
            )
        except ValueError as exc:  # an l2/l1 index, an ip one of raw vectors: similar pins only
            no_text = str(exc)
        if searcher is None:  # built once the failed one (and its GPU copy) is gone
            searcher = PinSearcher(
                store, backbone=backbone, index=index, config=config, cache_metadata=True
            )
            searcher.text_refusal = no_text  # type: ignore[attr-defined]
        searcher.warm()  # the metadata and filter groups, before the first request
        ready = {
            "ready": True,
            "store": str(store.root),
            "backbone": searcher.backbone,
            "index": searcher.index_name,
            "pins": store.catalog.count_pins(),
            "snapshot": store.snapshot,
        }
        responses.write(json.dumps(ready) + "\n")
        responses.flush()
        answered = 0
        for raw in requests:
            start = time.perf_counter()
            request: Any = None
            try:  # one bad request gets its error answered; the process goes on
                line = _decoded(raw).removeprefix("\ufeff")  # (a BOM, as Windows tools write)
                if not line.strip():
                    continue
                request = json.loads(line, parse_constant=_no_constant, parse_float=_finite)
                out = answer(searcher, request)
            except (PinsearchError, ValueError, TypeError, KeyError) as exc:
                out = {"error": str(exc)}
            except Exception as exc:  # the store changed under it, recursion, memory...
                out = {"error": f"{type(exc).__name__}: {exc}"}
            rid = request.get("id") if isinstance(request, dict) else None
            out = {"id": rid, **out, "ms": round((time.perf_counter() - start) * 1000, 3)}
            responses.write(json.dumps(out, default=str) + "\n")
            responses.flush()
            answered += 1
    return answered
