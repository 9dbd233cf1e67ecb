"""A local Google Cloud Storage server for the tests: gcp-storage-emulator, in memory, taught the
object generations that TensorStore's gcs driver relies on.

Usage: python tests/gcs_emulator.py PORT BUCKET

GCS sends an object's generation in the `x-goog-generation` header of a download and honours
`ifGenerationMatch` / `ifGenerationNotMatch` on reads, writes and deletes; TensorStore (under
Orbax's OCDBT checkpoints) uses both for its conditional writes. The emulator stores generations
but neither sends the header nor checks the conditions, so its object handlers are wrapped here,
before its server module binds them to routes.
"""

import functools
import sys
import threading
import time
from http import HTTPStatus
from http import server as server_module

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, request) -> str | None:
    """The stored object's generation; '0' when there is none (GCS's meaning of 0); None when
    the request names no object in its URL (a multipart upload names it in its body)."""
    name = request.params.get('object_id') or request.query.get('name', [None])[0]
    if name is None:
        return None
    try:
        return str(storage.get_file_obj(request.params['bucket_name'], name)['generation'])
    except NotFound:
        return '0'


def _failed_condition(request, generation: str) -> HTTPStatus | None:
    match, not_match = request.query.get('ifGenerationMatch'), request.query.get('ifGenerationNotMatch')
    if match and match[0] != generation:
        return HTTPStatus.PRECONDITION_FAILED
    if not_match and not_match[0] == generation:
        return HTTPStatus.NOT_MODIFIED if request.method == 'GET' else HTTPStatus.PRECONDITION_FAILED
    return None


def _with_generations(handler):
    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
        generation = _generation(storage, request)
        failed = None if generation is None else _failed_condition(request, generation)
        if failed is not None:
            response.status = failed
            return None
        result = handler(request, response, storage, *args, **kwargs)
        generation = _generation(storage, request)
        if generation not in (None, '0'):
            response['x-goog-generation'] = generation
            response['x-goog-metageneration'] = '1'
        return result
    return wrapped


for _name in ('get', 'download', 'insert', 'delete'):
    setattr(objects, _name, _with_generations(getattr(objects, _name)))

from gcp_storage_emulator import server as emulator_server  # noqa: E402 - after the handlers are wrapped

# TensorStore and gcsfs send many requests at once: each connection gets its own thread, so none
# waits on another's socket, while the emulator's storage (not thread-safe) handles one at a time.
server_module.HTTPServer = server_module.ThreadingHTTPServer
_one_at_a_time = threading.Lock()
_handle = emulator_server.Router.handle


def _handle_alone(router, method):
    with _one_at_a_time:
        return _handle(router, method)


emulator_server.Router.handle = _handle_alone


def _move(request, response, storage, *args, **kwargs):
    """objects.move (POST .../o/SOURCE/moveTo/o/DESTINATION), which gcsfs tries first for a rename:
    the emulator lacks it, and its 501 makes gcsfs retry for half a minute before copying."""
    bucket, source = request.params['bucket_name'], request.params['object_id']
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, request.params['dest_object_id'])
        storage.delete_file(bucket, source)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(moved)


emulator_server.HANDLERS = (
    (r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$',
     {'POST': _move}),
    *emulator_server.HANDLERS,
)


def main(port: str, bucket: str) -> None:
    server = emulator_server.create_server('127.0.0.1', int(port), in_memory=True, default_bucket=bucket)
    server.start()
    while True:
        time.sleep(3600)


if __name__ == '__main__':
    main(*sys.argv[1:])
