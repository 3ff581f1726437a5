"""Commands that query a store: query (pins, images, text, boards, titles), align, train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pinsearch.cli.common import (
    DEFAULT_STORE,
    BackboneOpt,
    EfSearchOpt,
    IndexOpt,
    JsonOpt,
    NprobeOpt,
    PrecisionOpt,
    RefineOpt,
    StoreOpt,
    app,
    console,
    emit_json,
    err_console,
    given_flags,
    make_config,
    print_rows,
    search_config,
)

TextOpt = Annotated[
    str | None, typer.Option("--text", "-t", help="Text query (CLIP tower or pinsearch align).")
]


@app.command()
def query(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    pin: Annotated[str | None, typer.Option("--pin", help="A stored pin id.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="A new image file.")] = None,
    text: TextOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 10,
    board: Annotated[str | None, typer.Option(help="Only pins of this board.")] = None,
    user: Annotated[str | None, typer.Option(help="Only pins of this user.")] = None,
    category: Annotated[str | None, typer.Option(help="Only pins of this category.")] = None,
    backbone: BackboneOpt = None,
    index_name: IndexOpt = None,
    classify: Annotated[
        bool, typer.Option("--classify", help="Predict the category with a stored head.")
    ] = False,
    head: Annotated[str | None, typer.Option(help="Head name for --classify.")] = None,
    boards: Annotated[
        bool, typer.Option("--boards", help="With --text: rank boards, each with its best pins.")
    ] = False,
    per_board: Annotated[int, typer.Option(min=1, help="Pins shown (and scored) per board.")] = 3,
    board_score: Annotated[str, typer.Option(help="Board score: topm or centroid.")] = "topm",
    mode: Annotated[
        str, typer.Option(help="With --text: match pin images, titles, or fused.")
    ] = "image",
    alpha: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Image weight of --mode fused.")
    ] = 0.5,
    titles: Annotated[
        list[str] | None,
        typer.Option("--titles", help="Candidate title to rank for --pin/--image (repeat)."),
    ] = None,
    titles_file: Annotated[
        Path | None, typer.Option(help="Candidate titles, one per line.")
    ] = None,
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
    precision: PrecisionOpt = None,
    refine: RefineOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find pins like a stored pin, a new image or a text; rank boards for a text; rank
    candidate titles for a pin; or classify a pin."""
    from pinsearch.store import Store

    if sum(x is not None for x in (pin, image, text)) != 1:
        raise typer.BadParameter("give exactly one of --pin, --image or --text")
    if image is not None and not image.is_file():
        what = "is a folder, not an image file" if image.is_dir() else "does not exist"
        raise typer.BadParameter(f"image {image} {what}", param_hint="--image")
    if classify and text is not None:
        raise typer.BadParameter("--classify takes a --pin or an --image, not --text")
    candidates = list(titles or [])
    if titles_file is not None:
        lines = titles_file.read_text(encoding="utf-8-sig").splitlines()
        candidates += [line.strip() for line in lines if line.strip()]
        if not candidates:
            raise typer.BadParameter(f"{titles_file} holds no title", param_hint="--titles-file")
    kind = (
        "--classify" if classify
        else "--titles" if titles is not None or titles_file is not None
        else "--boards" if boards
        else "--text" if text is not None
        else "--pin/--image"
    )  # fmt: skip
    flags = given_flags(ctx)  # (given, whatever the value: -k 10 is given too)
    given = {
        flag: flag in flags
        for flag in ("--board", "--user", "--category", "-k", "--index", "--boards", "--head",
                     "--per-board", "--board-score", "--mode", "--alpha", "--nprobe",
                     "--ef-search", "--precision", "--refine")
    }  # fmt: skip
    given["--titles"] = titles is not None or titles_file is not None
    index_opts = ("--index", "--nprobe", "--ef-search", "--precision", "--refine")
    uses = {  # what each kind of query does something with (-b: every kind)
        "--classify": ("-k", "--head"),
        "--titles": ("--titles", "--index"),
        "--boards": ("--boards", "-k", "--user", "--category", "--per-board", "--board-score",
                     *index_opts),
        # (title mode searches the title vectors' index: the image index's settings idle)
        "--text": ("-k", "--board", "--user", "--category", "--mode", "--alpha",
                   *(index_opts if mode != "title" else ())),
        "--pin/--image": ("-k", "--board", "--user", "--category", *index_opts),
    }[kind]  # fmt: skip
    unused = [flag for flag, on in given.items() if on and flag not in uses]
    if unused:  # (refused, not ignored: an option that does nothing misleads)
        raise typer.BadParameter(f"{kind} queries take no {', '.join(unused)}")
    if mode not in ("image", "title", "fused"):
        raise typer.BadParameter(f"--mode takes image, title or fused, not {mode!r}")
    if board_score not in ("topm", "centroid"):
        raise typer.BadParameter(f"--board-score takes topm or centroid, not {board_score!r}")
    if "--alpha" in flags and mode != "fused":
        raise typer.BadParameter("--alpha weighs --mode fused only")
    if classify:
        _classify(store, pin, image, head, k, as_json, backbone)
        return
    config = search_config(nprobe, ef_search, precision, refine)
    with Store.open(store, read_only=True) as s:
        if text is not None or candidates:
            from pinsearch.textsearch import TextSearcher, text_index_for

            if index_name is None and text is not None:  # (an l2 default: a cosine one)
                index_name = text_index_for(s, backbone)
            searcher: Any = TextSearcher(s, backbone=backbone, index=index_name, config=config)
        else:
            from pinsearch.search import PinSearcher

            searcher = PinSearcher(s, backbone=backbone, index=index_name, config=config)
        filters = {"board": board, "user": user, "category": category}
        if candidates:
            if text is not None:
                raise typer.BadParameter("--titles ranks texts for a --pin or --image")
            _show_titles(searcher.rank_texts(candidates, pin_id=pin, image=image), as_json)
            return
        if boards:
            if text is None:
                raise typer.BadParameter("--boards needs --text")
            found = searcher.search_boards(
                text, k, per_board=per_board, score=board_score, user=user, category=category
            )
            if not found.boards:
                _say_unmatched(searcher, user=user, category=category)
            _show_boards(found, as_json)
            return
        if text is not None:
            result = searcher.search_text(text, k, mode=mode, alpha=alpha, **filters)
        elif pin is not None:
            result = searcher.similar_to_pin(pin, k, **filters)
        else:
            result = searcher.similar_to_image(image, k, **filters)
        if not result.hits:
            _say_unmatched(searcher, **filters)
    if as_json:
        emit_json(result)
        return
    what = f"pin {pin}" if pin else f"image {image}" if image else f"text {text!r}"
    _hits_table(
        f"{len(result.hits)} pins like {what} ({result.backbone}, {result.metric})", result.hits
    )


def _say_unmatched(searcher: Any, **filters: str | None) -> None:
    """On stderr (beside --json too): the filters that alone name no pin of the store."""
    unmatched = searcher.unmatched_filters(**filters)
    if unmatched:
        err_console.print(
            f"no pin of the store has {' or '.join(unmatched)} (pinsearch info lists the "
            "categories and boards; --board takes a board's key or its name)"
        )


def _hits_table(title: str, hits: list[Any]) -> None:
    table = Table(title=title)
    for col in ("rank", "score", "pin_id", "title", "board", "category", "path"):
        table.add_column(col, overflow="fold")
    for h in hits:
        table.add_row(
            str(h.rank), f"{h.score:.4g}", h.pin_id, h.title, h.board_name, h.category, h.path
        )
    console.print(table)


def _show_boards(result: Any, as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"boards for {result.query['text']!r} ({result.score}, {result.backbone})")
    for col in ("rank", "score", "board", "user", "category", "pins", "best pins"):
        table.add_column(col, overflow="fold")
    for b in result.boards:
        best = "; ".join(f"{p.pin_id} {p.title}" for p in b.pins)
        table.add_row(
            str(b.rank), f"{b.score:.4f}", b.board_name, b.user or "", b.category or "",
            str(b.pins_in_board), best,
        )  # fmt: skip
    console.print(table)


def _show_titles(result: Any, as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    what = result.query.get("pin_id") or result.query.get("image")
    table = Table(title=f"titles for {what} ({result.text_encoder})")
    for col in ("rank", "score", "text"):
        table.add_column(col, overflow="fold")
    for m in result.matches:
        table.add_row(str(m.rank), f"{m.score:.4f}", m.text)
    console.print(table)


@app.command()
def align(
    store: StoreOpt = DEFAULT_STORE,
    backbone: BackboneOpt = None,
    captions: Annotated[
        Path | None,
        typer.Option(help="CSV of image (or path, pin_id) + caption; default: pin titles."),
    ] = None,
    text_model: Annotated[
        str | None, typer.Option(help="Sentence model: minilm (bundled) or a local folder.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    dim: Annotated[
        int | None, typer.Option(min=0, help="Joint space size (0: the image space itself).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    from_store: Annotated[
        Path | None,
        typer.Option("--from", help="Copy the alignment of another store (same backbone)."),
    ] = None,
    study: Annotated[
        Path | None,
        typer.Option(
            help="Train on the training part of this study's split of the store only (its "
            "zero-shot cells are then scored on pins the alignment never saw)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn text search for an image backbone from the store's own pins (LiT-style), or
    reuse another store's alignment (--from)."""
    from pinsearch.align import AlignConfig, align_store, copy_alignment
    from pinsearch.store import Store

    if from_store is not None:
        trained = {"--captions": captions, "--text-model": text_model, "--epochs": epochs,
                   "--dim": dim, "--device": device, "--seed": seed, "--study": study}  # fmt: skip
        given = [flag for flag, value in trained.items() if value is not None]
        if given:
            raise typer.BadParameter(
                f"--from copies an alignment trained elsewhere; {', '.join(given)} train one"
            )
    if captions is not None and not captions.is_file():
        raise typer.BadParameter(f"captions file {captions} does not exist")
    config = make_config(
        AlignConfig, text_model=text_model, epochs=epochs, dim=dim, device=device, seed=seed
    )
    split = _study_split(study) if study is not None else None
    with Store.open(store) as s:
        if from_store is not None:
            with Store.open(from_store, read_only=True) as src:
                report = copy_alignment(src, s, backbone)
        else:
            train = None
            if split is not None:  # (the sample and split the study makes of this store)
                from pinsearch.eval.study import select_pins

                data = select_pins(s, split)
                train = data.keys[data.train]
            report = align_store(s, backbone, config, captions=captions, keys=train)
    if as_json:
        emit_json(report.to_dict())
        return
    val = report.val
    if from_store is not None:
        console.print(
            f"copied the {report.text_model} -> {report.backbone} alignment of {from_store} "
            f"(trained on {report.pairs} texts of {report.images} images)"
        )
    else:
        console.print(
            f"aligned {report.text_model} -> {report.backbone} on {report.pairs} texts of "
            f"{report.images} pins ({report.source}"
            + (f", the training part of study {split.name}" if split is not None else "")
            + f"; {report.unmatched} unmatched) in {report.seconds:.1f} s, best epoch "
            f"{report.best_epoch + 1}/{report.epochs}"
        )
    if val:
        console.print(
            "its held-out images: "
            + ", ".join(f"R@{k} {val[f'recall@{k}']:.3f}" for k in (1, 5, 10))
            + f" (chance R@10 {val['chance_recall@10']:.3f})"
        )
    console.print(
        f"titles embedded now: {report.title_vectors} (those embedded before with this "
        "projection are kept)"
    )
    if report.stale_heads:
        console.print(f"stale heads (retrain them): {', '.join(report.stale_heads)}")


def _study_split(path: Path) -> Any:
    """The classification study file ``align --study`` takes its split from."""
    from pinsearch.eval.study import StudyConfig, load_study

    if not path.is_file():
        raise typer.BadParameter(f"study file {path} does not exist")
    config = load_study(path)
    if not isinstance(config, StudyConfig):
        raise typer.BadParameter(f"--study {path}: a classification study file is needed")
    return config


def _classify(
    store: Path,
    pin: str | None,
    image: Path | None,
    head: str | None,
    top: int,
    as_json: bool,
    backbone: str | None,
) -> None:
    from pinsearch.classify import classify
    from pinsearch.store import Store

    with Store.open(store, read_only=True) as s:
        result = classify(s, pin_id=pin, image=image, head=head, top=top, backbone=backbone)
    if as_json:
        emit_json(result)
        return
    console.print(
        f"[bold]{escape(result.predicted)}[/bold] "
        f"({escape(f'head {result.head}, {result.backbone}')})",
        markup=True,
    )
    print_rows("class scores", result.scores)
    if result.stale:
        err_console.print(
            f"[yellow]head {escape(result.head)} is stale[/yellow]: what it learnt from changed "
            f"since (pins of {escape(result.backbone)} added, removed or embedded again, labels "
            "edited, or a new text alignment for a zero-shot head); retrain it (pinsearch train)",
            markup=True,
        )


@app.command()
def train(
    store: StoreOpt = DEFAULT_STORE,
    backbone: BackboneOpt = None,
    head: Annotated[str, typer.Option(help="knn, lsvm, mlp, ...")] = "lsvm",
    param: Annotated[
        list[str] | None, typer.Option(help="Hyperparameter NAME=VALUE (JSON value), repeatable.")
    ] = None,
    label: Annotated[str, typer.Option(help="category, or a key of the pins' extra fields.")] = (
        "category"
    ),
    name: Annotated[str | None, typer.Option(help="Defaults to <backbone>/<head>.")] = None,
    normalize: Annotated[
        bool, typer.Option("--normalize", help="L2-normalise vectors first.")
    ] = False,
    only_embedded: Annotated[
        bool,
        typer.Option(
            "--only-embedded",
            help="Train on the labelled pins that have a vector (after a per_class study).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a classification head on a backbone's stored vectors and keep it in the store."""
    from pinsearch.classify import train_head
    from pinsearch.store import Store

    params: dict[str, Any] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    with Store.open(store) as s:
        info_ = train_head(
            s, backbone or s.resolve_backbone(None), head, params, label=label, name=name,
            normalize=normalize, only_embedded=only_embedded,
        )  # fmt: skip
    if as_json:
        emit_json(info_)
        return
    console.print(
        f"trained head [bold]{escape(info_.name)}[/bold] "
        + escape(
            f"({info_.head} {info_.params}) on {info_.n_train} pins, {len(info_.classes)} "
            f"classes of {info_.label!r}"
        ),
        markup=True,
    )


@app.command()
def serve(
    store: StoreOpt = DEFAULT_STORE,
    backbone: BackboneOpt = None,
    index_name: IndexOpt = None,
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
    precision: PrecisionOpt = None,
    refine: RefineOpt = None,
) -> None:
    """Warm query process: JSON requests on stdin, one JSON answer per line on stdout
    (pins like a pin or image, text, boards, titles; see the README)."""
    from pinsearch.serve import serve as run

    n = run(
        store,
        backbone,
        index=index_name,
        config=search_config(nprobe, ef_search, precision, refine),
    )
    err_console.print(f"answered {n} requests")
