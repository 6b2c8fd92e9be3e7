"""``fundus-edge run``: live fundus-camera inference with maps."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app

_JSONL_HELP = (
    "Write one JSON record per processed frame (and its table, the same name with .csv): "
    "source, frame, timestamp, image, rel (path under the source root), eye (R, L or null), "
    "dicom{patient_id, study_uid, series_uid, sop_uid, eye, acquired, modality, manufacturer, "
    "model_name...} (null unless DICOM), position_s, "
    "quality{score,passed,reason,sharpness,underexposed,overexposed,fov_found}, inferred, "
    "probabilities{label: p} (null when the quality gate stopped the frame), positive[labels], "
    "screening, fov{cx,cy,r,found}, ms{preprocess,quality,infer,postprocess,latency}."
)


@app.command()
def run(
    model: Path = typer.Argument(
        ..., help="Exported model: .onnx, .engine/.plan (+ .json sidecar), or a checkpoint."
    ),
    source: str | None = typer.Argument(
        None,
        help="Video file, image or DICOM file, folder (its images and DICOM files, subfolders "
        "too), glob ('imgs/*.png'), /dev/videoN, csi://N, rtsp://, http://, sim://1920x1080@30 "
        "(a simulated camera).",
    ),
    camera: int | None = typer.Option(None, "--camera", "-c", help="V4L2 camera index."),
    width: int | None = typer.Option(None, "--width", help="Requested capture width (cameras)."),
    height: int | None = typer.Option(None, "--height", help="Requested capture height (cameras)."),
    fps: float | None = typer.Option(
        None, "--fps", help="Requested capture frame rate (> 0); also the --save-video rate."
    ),
    loop: bool = typer.Option(False, "--loop", help="Start a file source over at its end."),
    reconnect: float = typer.Option(
        10.0,
        "--reconnect",
        help="Seconds (>= 0) to keep reconnecting a lost camera or stream; 0: do not.",
    ),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help="auto (the fastest that passes parity here, measured once and cached beside the "
        "model) | onnxruntime | openvino | tensorrt | torch [default: by the model file's suffix].",
    ),
    precision: str | None = typer.Option(
        None, "--precision", help="OpenVINO compute: fp32 | bf16 | int8 [default: the file's]."
    ),
    provider: str | None = typer.Option(
        None, "--provider", help="ONNX Runtime provider: tensorrt, cuda, cpu (default: best)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="PyTorch device for checkpoints; OpenVINO device (CPU, GPU, NPU)."
    ),
    cuda_graph: bool = typer.Option(
        False, "--cuda-graph", help="Replay CUDA graphs (TensorRT engines)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        help="Inference threads of ONNX Runtime or OpenVINO "
        "[default: its own]. On a small CPU, 1 leaves the other cores to decoding and "
        "preparing frames.",
    ),
    streams: int = typer.Option(
        1,
        "--streams",
        help="Frames in flight: N prepare workers and, with ONNX Runtime, N inference threads "
        "sharing the model (other backends take the frames in turn). With --threads 1, a second "
        "stream helps when a core is idle; with the model on a GPU, N prepare workers use N CPU "
        "cores. Results keep frame order.",
    ),
    headless: bool = typer.Option(False, "--headless", help="No window."),
    save_video: Path | None = typer.Option(
        None,
        "--save-video",
        help="Write the annotated frames as a video (.mp4, .m4v, .mov, .mkv, .avi).",
    ),
    save_dir: Path | None = typer.Option(
        None, "--save-dir", help="Write each annotated frame as an image into this folder."
    ),
    jsonl: Path | None = typer.Option(None, "--jsonl", help=_JSONL_HELP),
    capture: Path | None = typer.Option(
        None,
        "--capture",
        help="Save the best frame once the quality gate passes (the original frame, + .json), then stop.",
    ),
    capture_window: int = typer.Option(
        10,
        "--capture-window",
        help="Frames (>= 0) watched after the first good one for --capture.",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 2 when any file or frame had to be skipped."
    ),
    no_gate: bool = typer.Option(
        False, "--no-gate", help="Infer on frames that fail the quality gate too."
    ),
    no_fov_track: bool = typer.Option(
        False,
        "--no-fov-track",
        help="Fit the field of view in every frame of a video or camera too (default: fit it "
        "once, then track it; stills are always fitted one by one).",
    ),
    smoothing: float | None = typer.Option(
        None,
        "--smoothing",
        help="Exponential smoothing of probabilities in [0, 1) (default 0.6 live, 0 for files).",
    ),
    map_: str = typer.Option(
        "auto", "--map", help="Map to draw: auto (top finding), attention, none, or a label."
    ),
    max_frames: int | None = typer.Option(
        None, "--max-frames", help="Stop after this many frames."
    ),
    summary_json: Path | None = typer.Option(
        None, "--summary-json", help="Also write the run summary as JSON."
    ),
    report: Path | None = typer.Option(
        None,
        "--report",
        help="Write one screening report per visit (patient + study) into this folder: HTML, "
        "PDF and, for DICOM input, DICOM Encapsulated PDF + Secondary Captures; also "
        "results.jsonl/.csv there unless --jsonl is given.",
    ),
    send: str | None = typer.Option(
        None, "--send", help="C-STORE the report's DICOM objects to a PACS: AE@HOST:PORT."
    ),
    anonymise: bool = typer.Option(
        False,
        "--anonymise",
        help="Replace file names and DICOM identifiers by salted hashes in every output; "
        "write no names (salt: $FUNDUS_EDGE_SALT or ~/.config/fundus-edge/anonymise.salt).",
    ),
    watch: Path | None = typer.Option(
        None,
        "--watch",
        help="Watch this folder for new stills and DICOM files (instead of SOURCE); each is "
        "processed once, also across restarts (a journal beside the results). Needs --jsonl "
        "or --report. Stop with Ctrl-C.",
    ),
    serve: str | None = typer.Option(
        None,
        "--serve",
        help="Serve a live browser view on [HOST:]PORT (default host 127.0.0.1): the annotated "
        "frame, findings, quality, FPS, a map selector and a Capture button. Beyond loopback a "
        "token is required (given, $FUNDUS_EDGE_TOKEN, or generated and printed once).",
    ),
    token: str | None = typer.Option(
        None, "--token", help="The live view's access token (>= 8 characters)."
    ),
    cert: Path | None = typer.Option(None, "--cert", help="HTTPS certificate (PEM) for --serve."),
    key: Path | None = typer.Option(None, "--key", help="Its private key (PEM)."),
    max_viewers: int = typer.Option(
        8,
        "--max-viewers",
        help="Live-view viewers at most (a browser tab: one stream and one event listener).",
    ),
    serve_fps: float = typer.Option(
        10.0,
        "--serve-fps",
        help="Frames (and result events) a second the live view sends at most; only those frames are rendered for it.",
    ),
    capture_dir: Path | None = typer.Option(
        None,
        "--capture-dir",
        help="Where the live view's Capture button saves [default: ./captures].",
    ),
    watch_settle: float = typer.Option(
        1.0,
        "--watch-settle",
        help="Seconds a new file's size must stay unchanged before it is read (> 0).",
    ),
) -> int:
    """Run a model on a camera, stream, video or images: maps, labels, quality gate, logs.

    Exit codes: 0 done (also after a lost camera, see the summary); 2 bad input, nothing
    could be read from the source, skipped files/frames with --strict, or nothing captured
    with --capture; 130 interrupted (outputs are complete).
    """
    from fundus_edge.errors import EXIT_INTERRUPTED, DataError, UserError
    from fundus_edge.fileio import atomic_write_json, ensure_writable_file
    from fundus_edge.runtime.pipeline import RunConfig
    from fundus_edge.runtime.pipeline import run as run_pipeline

    if sum(x is not None for x in (source, camera, watch)) != 1:
        raise UserError("give exactly one source: a SOURCE argument, --camera N or --watch DIR")
    if summary_json is not None:
        # Written when the source ends, maybe hours from now: prove the place writable first.
        ensure_writable_file(summary_json, "--summary-json")
    cfg = RunConfig(
        model=model,
        source=camera if camera is not None else (source if source is not None else str(watch)),  # type: ignore[arg-type]
        width=width,
        height=height,
        fps=fps,
        loop=loop,
        reconnect=reconnect,
        backend=backend,
        precision=precision,
        provider=provider,
        device=device,
        cuda_graph=cuda_graph,
        threads=threads,
        streams=streams,
        headless=headless,
        save_video=save_video,
        save_dir=save_dir,
        jsonl=jsonl,
        capture=capture,
        capture_window=capture_window,
        strict=strict,
        gate=not no_gate,
        track_fov=not no_fov_track,
        smoothing=smoothing,
        map=map_,
        max_frames=max_frames,
        report=report,
        send=send,
        anonymise=anonymise,
        watch=watch,
        watch_settle=watch_settle,
        serve=serve,
        token=token,
        cert=cert,
        key=key,
        max_viewers=max_viewers,
        serve_fps=serve_fps,
        capture_dir=capture_dir,
    )
    summary = run_pipeline(cfg)
    for line in summary.lines():
        typer.echo(line)
    if summary_json is not None:
        try:
            atomic_write_json(summary_json, summary.to_dict())
        except OSError as exc:  # the folder changed during the run
            why = exc.strerror or type(exc).__name__
            raise UserError(f"--summary-json {summary_json}: cannot write ({why})") from None
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.frames_read == 0:
        why = summary.stop_reason or "end of source"
        if summary.skipped:
            first = summary.skipped[0]
            why = f"{len(summary.skipped)} item(s) skipped, first {first.item}: {first.reason}"
        raise DataError(f"{summary.source}: nothing could be read ({why})")
    if strict and summary.skipped:
        first = summary.skipped[0]
        raise DataError(
            f"{len(summary.skipped)} item(s) skipped under --strict, first {first.item}: {first.reason}"
        )
    if summary.captured is False:
        raise DataError(f"{summary.source}: no frame passed the quality gate; nothing captured")
    return 0
