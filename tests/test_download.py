"""insclr.download against a local HTTP server on 127.0.0.1 (Range support and fault modes).

No test contacts a real address: every base address is pointed at the local server.
"""

import hashlib
import io
import shutil
import struct
import tarfile
import threading
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from insclr.download import main as download_main
from insclr.download import download
from insclr.download.archive import UnsafeArchiveError, extract
from insclr.download.catalog import BASE_URLS, parse_parts
from insclr.download.http import ChecksumError, DownloadError, fetch


class FileServer:
    """Serves `files` {path: bytes}; faults {path: [mode, ...]} are used up one request at a time.

    Modes: "drop" sends the full Content-Length but closes after half the body; "503" answers
    Service Unavailable; "ignore-range" answers 200 with the whole body even to a Range request;
    "garble" sends a body of the right length whose second half is zeros.
    """

    def __init__(self):
        self.files, self.faults, self.log = {}, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                fault = server.faults.get(self.path, [])
                mode = fault.pop(0) if fault else None
                if mode == "503":
                    self.send_error(503)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and mode != "ignore-range":
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                chunk = body[start:]
                if mode == "garble":
                    chunk = chunk[: len(chunk) // 2] + bytes(len(chunk) - len(chunk) // 2)
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if mode == "drop":
                    self.wfile.write(chunk[: len(chunk) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def bases(self):
        """Every base address of the catalogue pointed at this server, under /KEY/."""
        return {key: f"{self.url}/{key}/" for key in BASE_URLS}


@pytest.fixture
def server():
    s = FileServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _tar_bytes(members, mode="w:gz"):
    """members: [(name, bytes)] regular files, or (name, None, linktarget) symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for m in members:
            info = tarfile.TarInfo(m[0])
            if m[1] is None:
                info.type, info.linkname = tarfile.SYMTYPE, m[2]
                tar.addfile(info)
            else:
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def _zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _rar_block(head_type, flags, body):
    rest = struct.pack("<BHH", head_type, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(rest) & 0xFFFF) + rest


def _rar_bytes(members):
    """A RAR 4 archive of stored (uncompressed) members [(name, bytes, unix mode)]."""
    out = b"Rar!\x1a\x07\x00" + _rar_block(0x73, 0, b"\0" * 6)
    for name, data, mode in members:
        raw = name.encode()
        head = struct.pack("<IIBIIBBHI", len(data), len(data), 3, zlib.crc32(data), 0x00210000, 20, 0x30,
                           len(raw), mode)
        out += _rar_block(0x74, 0x8000, head + raw) + data
    return out + _rar_block(0x7B, 0x4000, b"")


needs_bsdtar = pytest.mark.skipif(shutil.which("bsdtar") is None,
                                  reason="RAR extraction needs bsdtar (apt-get install libarchive-tools)")


def test_fetch_plain_then_skip(server, tmp_path):
    server.files["/f.bin"] = b"abc" * 1000
    dest, _, size = fetch(server.url + "/f.bin", tmp_path / "f.bin", md5=hashlib.md5(b"abc" * 1000).hexdigest())
    assert dest.read_bytes() == b"abc" * 1000 and size == 3000
    fetch(server.url + "/f.bin", tmp_path / "f.bin")
    assert len(server.log) == 1  # a complete file is not fetched again


def test_resume_after_dropped_connection(server, tmp_path):
    body = bytes(range(256)) * 800
    server.files["/big.bin"] = body
    server.faults["/big.bin"] = ["drop"]
    dest, _, _ = fetch(server.url + "/big.bin", tmp_path / "big.bin", sha256=hashlib.sha256(body).hexdigest(),
                       backoff=0.01)
    assert dest.read_bytes() == body
    assert server.log[0][1] is None
    assert server.log[1][1] == f"bytes={len(body) // 2}-"  # the second request asks only for the tail
    assert not (tmp_path / "big.bin.part").exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    body = b"0123456789" * 500
    server.files["/r.bin"] = body
    server.faults["/r.bin"] = ["drop", "ignore-range"]
    dest, _, _ = fetch(server.url + "/r.bin", tmp_path / "r.bin", size=len(body), backoff=0.01)
    assert dest.read_bytes() == body


def test_retries_with_backoff_then_give_up(server, tmp_path):
    server.files["/flaky"] = b"data"
    server.faults["/flaky"] = ["503", "503"]
    dest, _, _ = fetch(server.url + "/flaky", tmp_path / "flaky", retries=2, backoff=0.01)
    assert dest.read_bytes() == b"data" and len(server.log) == 3
    server.faults["/flaky"] = ["503"] * 5
    with pytest.raises(DownloadError, match="giving up after 1 retries"):
        fetch(server.url + "/flaky", tmp_path / "again", retries=1, backoff=0.01)
    assert not (tmp_path / "again").exists()


def test_missing_file_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server.url + "/nope", tmp_path / "nope", retries=3, backoff=5)
    assert len(server.log) == 1


def test_corrupted_file_fails_loudly_and_is_not_kept(server, tmp_path):
    server.files["/c.bin"] = b"corrupted bytes"
    with pytest.raises(ChecksumError, match="md5"):
        fetch(server.url + "/c.bin", tmp_path / "c.bin", md5=hashlib.md5(b"the real bytes").hexdigest())
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()


def test_gldv2_parts_md5_and_corruption(server, tmp_path, capsys):
    tars = {i: _tar_bytes([(f"0/1/2/{i:016x}.jpg", b"jpeg%d" % i)], mode="w") for i in range(3)}
    server.files["/gldv2/metadata/train_clean.csv"] = b"landmark_id,images\n1,0000000000000000\n"
    for i, data in tars.items():
        server.files[f"/gldv2/train/images_{i:03d}.tar"] = data
        server.files[f"/gldv2/md5sum/train/md5.images_{i:03d}.txt"] = \
            f"{hashlib.md5(data).hexdigest()}  images_{i:03d}.tar\n".encode()
    args = ["gldv2", "--root", str(tmp_path), "--parts", "0-1", "--backoff", "0.01"]
    args += [a for k, v in server.bases().items() for a in ("--base-url", f"{k}={v}")]
    assert download_main(args) == 0
    train = tmp_path / "gldv2" / "train"
    assert sorted(p.name for p in train.rglob("*.jpg")) == ["0000000000000000.jpg", "0000000000000001.jpg"]
    assert (tmp_path / "gldv2" / "train_clean.csv").is_file()
    assert not list((tmp_path / ".downloads" / "archives").iterdir())  # archives deleted after extraction
    # part 2 served corrupted: the md5 check fails loudly and nothing of it is kept
    server.files["/gldv2/train/images_002.tar"] = tars[2][:-10] + b"X" * 10
    assert download_main(args[:4] + ["2"] + args[5:]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert not (train / "0" / "1" / "2" / "0000000000000002.jpg").exists()
    assert not list((tmp_path / ".downloads" / "archives").glob("images_002.tar*"))
    # a rerun of the finished parts makes no request
    before = len(server.log)
    download(["gldv2"], tmp_path, parts="0-1", base_urls=server.bases())
    assert len(server.log) == before


def test_roxford_layout_and_recorded_checksum(server, tmp_path):
    server.files["/revisitop/roxford5k/gnd_roxford5k.pkl"] = b"pickle"
    server.files["/oxford/oxbuild_images-v1.tgz"] = _tar_bytes(
        [("all_souls_000000.jpg", b"a"), ("sub/radcliffe_000001.jpg", b"b")])
    rows = download(["roxford5k"], tmp_path, base_urls=server.bases(), backoff=0.01)
    assert [r["status"] for r in rows] == ["downloaded", "downloaded"]
    jpg = tmp_path / "roxford5k" / "jpg"
    assert sorted(p.name for p in jpg.iterdir()) == ["all_souls_000000.jpg", "radcliffe_000001.jpg"]
    gnd = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match="recorded"):
        download(["roxford5k"], tmp_path, base_urls=server.bases(), verify=True)


@needs_bsdtar
def test_instre_rar_and_picked_ground_truth(server, tmp_path):
    server.files["/instre/INSTRE_release.rar"] = _rar_bytes(
        [("INSTRE-S1/01a_book/001.jpg", b"img", 0o100644), ("INSTRE-M/01/002.jpg", b"img2", 0o100644)])
    server.files["/instre-gnd/test_script.zip"] = _zip_bytes(
        [("test_script/gnd_instre.mat", b"mat"), ("test_script/compute_map.m", b"%")])
    download(["instre"], tmp_path, base_urls=server.bases())
    root = tmp_path / "instre"
    assert (root / "gnd_instre.mat").read_bytes() == b"mat"
    assert (root / "INSTRE-S1" / "01a_book" / "001.jpg").read_bytes() == b"img"
    assert not (root / "compute_map.m").exists() and not (root / "test_script").exists()


def _assert_rejected_before_writing(tmp_path, name, data, message):
    """Extracting archive bytes `data` (saved as `name`) fails with `message` and writes nothing."""
    archive = tmp_path / name
    archive.write_bytes(data)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=message):
        extract(archive, dest)
    assert not any(dest.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, "out"]


@pytest.mark.parametrize("members, message", [
    ([("../evil.txt", b"x")], "'..'"),
    ([("/tmp/evil.txt", b"x")], "absolute"),
    ([("ok.txt", b"x"), ("lnk", None, "../../outside")], "outside"),
    ([("lnk", None, "/etc/passwd")], "absolute"),
])
def test_malicious_tar_rejected_before_writing(tmp_path, members, message):
    _assert_rejected_before_writing(tmp_path, "evil.tgz", _tar_bytes(members), message)


def test_malicious_zip_rejected(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip_bytes([("good.txt", b"x"), ("a/../../evil.txt", b"x")]))
    with pytest.raises(UnsafeArchiveError, match="'..'"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "good.txt").exists()


@needs_bsdtar
@pytest.mark.parametrize("members, message", [
    ([("../evil.txt", b"evil", 0o100644)], "'..'"),
    ([("dir/lnk", b"../../outside", 0o120777), ("ok.txt", b"x", 0o100644)], "points outside"),
])
def test_malicious_rar_rejected(tmp_path, members, message):
    _assert_rejected_before_writing(tmp_path, "evil.rar", _rar_bytes(members), message)


def test_rar_without_bsdtar_names_the_package(tmp_path, monkeypatch):
    archive = tmp_path / "x.rar"
    archive.write_bytes(_rar_bytes([("a.txt", b"a", 0o100644)]))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(RuntimeError, match="libarchive-tools"):
        extract(archive, tmp_path / "out")


def test_parse_parts_and_bad_input(capsys):
    assert parse_parts("0-2,5", 0, 9, "x") == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="outside x's parts 0-9"):
        parse_parts("8-12", 0, 9, "x")
    assert download_main(["nosuchset", "--dry-run"]) == 1
    assert "unknown dataset" in capsys.readouterr().err
    assert download_main(["revisitop1m", "--dry-run", "--parts", "1-2"]) == 0
    out = capsys.readouterr().out
    assert "revisitop1m.1.tar.gz" in out and "revisitop1m.2.tar.gz" in out and "revisitop1m.3.tar" not in out


def _oxford(server, archive):
    server.files["/revisitop/roxford5k/gnd_roxford5k.pkl"] = b"pickle"
    server.files["/oxford/oxbuild_images-v1.tgz"] = archive


def test_damaged_archive_of_the_right_size_is_moved_aside_and_fetched_again(server, tmp_path, capsys):
    archive = _tar_bytes([(f"all_souls_{i:06d}.jpg", bytes(range(256)) * 8) for i in range(4)])
    _oxford(server, archive)
    server.faults["/oxford/oxbuild_images-v1.tgz"] = ["garble"]  # damaged once, in transit
    rows = download(["roxford5k"], tmp_path, base_urls=server.bases(), backoff=0.01)
    assert [r["status"] for r in rows] == ["downloaded", "downloaded"]
    assert len(list((tmp_path / "roxford5k" / "jpg").iterdir())) == 4
    err = capsys.readouterr().err
    assert "damaged or truncated tar archive" in err and "oxbuild_images-v1.tgz.corrupt, downloading it again" in err
    assert not list((tmp_path / ".downloads" / "archives").iterdir())  # neither the damaged nor the good copy


def test_archive_damaged_every_time_is_an_error_then_fetched_again_on_the_next_run(server, tmp_path, capsys):
    good = _tar_bytes([("all_souls_000000.jpg", bytes(range(256)) * 8)])
    _oxford(server, good)
    server.faults["/oxford/oxbuild_images-v1.tgz"] = ["garble", "garble"]
    args = ["roxford5k", "--root", str(tmp_path), "--backoff", "0.01"]
    args += [a for k, v in server.bases().items() for a in ("--base-url", f"{k}={v}")]
    assert download_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    aside = tmp_path / ".downloads" / "archives" / "oxbuild_images-v1.tgz.corrupt"
    assert err[-1].startswith("error: ") and f"fetched again and still damaged; the copy is kept as {aside}" in err[-1]
    assert aside.is_file() and len(aside.read_bytes()) == len(good)
    # the damaged copy was not taken as complete: the next run fetches it again, now whole
    assert download_main(args) == 0
    assert (tmp_path / "roxford5k" / "jpg" / "all_souls_000000.jpg").is_file() and not aside.exists()


def test_archive_damaged_on_disk_since_an_earlier_run_is_fetched_again(server, tmp_path):
    good = _tar_bytes([("all_souls_000000.jpg", bytes(range(256)) * 8)])
    _oxford(server, good)
    archive = tmp_path / ".downloads" / "archives" / "oxbuild_images-v1.tgz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(bytes(len(good)))  # the right size, left by a run whose extraction failed
    download(["roxford5k"], tmp_path, base_urls=server.bases(), backoff=0.01)
    assert (tmp_path / "roxford5k" / "jpg" / "all_souls_000000.jpg").is_file()


def test_archives_with_a_dot_member_are_accepted(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:  # as `tar -czf x.tgz -C folder .` writes it
        for name, data in ((".", None), ("./sub", None), ("./sub/a.jpg", b"a")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "dot.tgz").write_bytes(buf.getvalue())
    assert extract(tmp_path / "dot.tgz", tmp_path / "out") == 2
    assert (tmp_path / "out" / "sub" / "a.jpg").read_bytes() == b"a"
    (tmp_path / "dot.zip").write_bytes(_zip_bytes([("./", b""), ("./b.jpg", b"b")]))
    extract(tmp_path / "dot.zip", tmp_path / "out")
    assert (tmp_path / "out" / "b.jpg").read_bytes() == b"b"
    (tmp_path / "f.tar").write_bytes(_tar_bytes([(".", b"x")], mode="w"))
    with pytest.raises(UnsafeArchiveError, match="empty name"):  # a file called '.' is still refused
        extract(tmp_path / "f.tar", tmp_path / "out2")


def test_root_that_is_a_file_is_an_error_line(tmp_path, capsys):
    root = tmp_path / "datasets"
    root.write_text("not a folder")
    assert download_main(["roxford5k", "--root", str(root)]) == 1
    assert capsys.readouterr().err == f"error: --root {root}: is a file, not a folder\n"
    assert download_main(["roxford5k", "--root", str(root / "below")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --root {root / 'below' / '.downloads'}: a file is in the way")
    assert "Traceback" not in err
