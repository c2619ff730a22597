""" A stand-in for the Hugging Face Hub on 127.0.0.1, for tests of the real huggingface_hub client.

Serves the repositories under `root/<org>/<name>/` with the Hub's file protocol:
`HEAD`/`GET /<org>/<name>/resolve/<revision>/<path>` answer with `X-Repo-Commit`, `ETag` (the
file's sha256, as the Hub does for LFS files) and `Content-Length`; a missing repository, revision
or file is a 404 with the Hub's `X-Error-Code`. The commit id is derived from the files, so
changing a file on disk publishes a new revision.

It also answers the calls of `HfApi.create_repo` and of `HfApi.upload_folder` without Xet
(`HF_HUB_DISABLE_XET=1`): preupload, the LFS batch API with basic transfers, and the ndjson commit.

Faults per file (`server.faults[(repo_id, path)] = ...`): `'error'` answers 500 (with
`Retry-After: 0` so the client's retries stay short), `'truncate'` sends half the body with a
matching `Content-Length` after a full-size `HEAD`, `'corrupt'` flips one byte of the body.

Only the standard library is used, so a client process can start the server before it imports
huggingface_hub (which reads `HF_ENDPOINT` at import). The server stops itself after `lifetime` s.
"""
import base64
import hashlib
import http.server
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

__all__ = ['HubServer']

_LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt')


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HubServer:
    """Serve `root` as a Hub on a free port of 127.0.0.1 from a daemon thread; use as a context manager."""

    def __init__(self, root, lifetime: float = 300.0):
        self.root = Path(root)
        self.lifetime = lifetime
        self.faults: Dict[Tuple[str, str], str] = {}
        self.requests: List[str] = []  # 'METHOD /path status', in order
        self.lock = threading.RLock()
        self.lfs_objects: Dict[str, bytes] = {}  # uploaded LFS content by sha256, until committed
        self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self
        self.url = f'http://127.0.0.1:{self._httpd.server_address[1]}'
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None

    def start(self) -> 'HubServer':
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread = None

    def __enter__(self) -> 'HubServer':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / repo_id

    def commit(self, repo_id: str) -> str:
        """Commit id of the repository's current content: a sha1 over its files' paths and sha256s."""
        digest = hashlib.sha1()
        repo = self.repo_dir(repo_id)
        for path in sorted(p for p in repo.rglob('*') if p.is_file()):
            digest.update(f'{path.relative_to(repo).as_posix()}\0{_sha256(path.read_bytes())}\n'.encode())
        return digest.hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 30  # seconds a connection may idle, so a stuck client cannot hold a thread forever

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format, *args) -> None:
        pass  # requests are recorded in `hub.requests` instead

    def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
              content_length: Optional[int] = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)
        with self.hub.lock:
            self.hub.requests.append(f'{self.command} {self.path} {status}')

    def _json(self, status: int, payload, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(payload).encode(), {'Content-Type': 'application/json', **(headers or {})})

    def _error(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        headers = {'X-Error-Code': code, 'X-Error-Message': message, **(headers or {})}
        self._json(status, {'error': message}, headers)

    def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b';')[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b''.join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get('Content-Length', 0)))

    def _repo(self, org: str, name: str) -> Optional[str]:
        repo_id = f'{org}/{name}'
        return repo_id if self.hub.repo_dir(repo_id).is_dir() else None

    # file protocol

    def do_HEAD(self) -> None:
        self._resolve()

    def do_GET(self) -> None:
        self._resolve()

    def _resolve(self) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.strip('/').split('/')]
        if len(parts) < 5 or parts[2] != 'resolve':
            return self._error(404, 'NotFound', f'No route for {self.path}')
        org, name, _, revision = parts[:4]
        filename = '/'.join(parts[4:])
        repo_id = self._repo(org, name)
        if repo_id is None:
            return self._error(404, 'RepoNotFound', 'Repository not found')
        with self.hub.lock:
            commit = self.hub.commit(repo_id)
            fault = self.hub.faults.get((repo_id, filename))
        if revision not in ('main', commit):
            return self._error(404, 'RevisionNotFound', f'Invalid rev id: {revision}')
        repo = self.hub.repo_dir(repo_id).resolve()
        path = (repo / filename).resolve()
        if repo not in path.parents or not path.is_file():
            return self._error(404, 'EntryNotFound', f'{filename} does not exist', {'X-Repo-Commit': commit})
        if fault == 'error':
            return self._error(500, 'InternalError', 'Internal Error (injected)', {'Retry-After': '0'})
        data = path.read_bytes()
        headers = {'X-Repo-Commit': commit, 'ETag': f'"{_sha256(data)}"', 'Content-Type': 'application/octet-stream'}
        if self.command == 'GET' and fault == 'truncate':
            data = data[:len(data) // 2]
        elif self.command == 'GET' and fault == 'corrupt':
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        self._send(200, data, headers, content_length=len(data))

    # upload protocol

    def do_POST(self) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.strip('/').split('/')]
        body = self._body()
        if parts == ['api', 'repos', 'create']:
            return self._create_repo(json.loads(body))
        if parts == ['api', 'validate-yaml']:
            return self._json(200, {'errors': [], 'warnings': []})
        if len(parts) == 6 and parts[:2] == ['api', 'models'] and parts[4] in ('preupload', 'commit'):
            repo_id = self._repo(parts[2], parts[3])
            if repo_id is None:
                return self._error(404, 'RepoNotFound', 'Repository not found')
            if parts[4] == 'preupload':
                return self._preupload(json.loads(body))
            return self._commit(repo_id, body)
        if len(parts) == 6 and parts[1].endswith('.git') and parts[2:] == ['info', 'lfs', 'objects', 'batch']:
            if self._repo(parts[0], parts[1][:-len('.git')]) is None:
                return self._error(404, 'RepoNotFound', 'Repository not found')
            return self._lfs_batch(json.loads(body))
        self._error(404, 'NotFound', f'No route for POST {self.path}')

    def do_PUT(self) -> None:
        parts = urlsplit(self.path).path.strip('/').split('/')
        body = self._body()
        if len(parts) != 2 or parts[0] != '_lfs':
            return self._error(404, 'NotFound', f'No route for PUT {self.path}')
        if _sha256(body) != parts[1]:
            return self._error(400, 'BadRequest', 'Uploaded content does not match its sha256')
        with self.hub.lock:
            self.hub.lfs_objects[parts[1]] = body
        self._send(200)

    def _create_repo(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        repo = self.hub.repo_dir(repo_id)
        url = f'{self.hub.url}/{repo_id}'
        if repo.is_dir():
            return self._json(409, {'error': 'You already created this model repo', 'url': url})
        repo.mkdir(parents=True)
        self._json(200, {'url': url, 'name': repo_id})

    def _preupload(self, payload: dict) -> None:
        files = [
            {'path': f['path'], 'uploadMode': 'lfs' if f['path'].endswith(_LFS_SUFFIXES) else 'regular',
             'shouldIgnore': False, 'oid': None}
            for f in payload['files']]
        self._json(200, {'files': files})

    def _lfs_batch(self, payload: dict) -> None:
        objects = [
            {'oid': o['oid'], 'size': o['size'], 'authenticated': True,
             'actions': {'upload': {'href': f"{self.hub.url}/_lfs/{o['oid']}"}}}
            for o in payload['objects']]
        self._json(200, {'transfer': 'basic', 'objects': objects})

    def _commit(self, repo_id: str, body: bytes) -> None:
        files: Dict[str, bytes] = {}
        with self.hub.lock:
            for line in body.splitlines():
                item = json.loads(line)
                value = item['value']
                if item['key'] == 'file':
                    files[value['path']] = base64.b64decode(value['content'])
                elif item['key'] == 'lfsFile':
                    if value['oid'] not in self.hub.lfs_objects:
                        return self._error(400, 'BadRequest', f"LFS object {value['oid']} was not uploaded")
                    files[value['path']] = self.hub.lfs_objects[value['oid']]
                elif item['key'] != 'header':
                    return self._error(400, 'BadRequest', f"Unsupported commit operation {item['key']}")
            repo = self.hub.repo_dir(repo_id)
            for name, data in files.items():
                target = repo / name
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f'.{target.name}.')
                with os.fdopen(fd, 'wb') as f:
                    f.write(data)
                os.replace(tmp, target)
            commit = self.hub.commit(repo_id)
        self._json(200, {'commitUrl': f'{self.hub.url}/{repo_id}/commit/{commit}', 'commitOid': commit,
                         'pullRequestUrl': None})
