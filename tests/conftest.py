"Fixtures shared by test modules"
import logging, os, select, socket, time
import pytest

# Loading threads for batches of any size: the tests' items are small, and below MemmapDL.thread_min_bytes (384 KiB a
# batch) an epoch is read without threads. Set before fastai_memmap is imported, and inherited by every subprocess and
# notebook the tests start, so the thread path is what they check; test_threads.py checks the default rule itself.
os.environ['FASTAI_MEMMAP_THREAD_MIN_BYTES'] = '0'

BUCKET = 'fmm-test'

@pytest.fixture(scope='module')
def s3(tmp_path_factory):
    "A moto S3 server on 127.0.0.1 (a free port), the environment pointing boto3/s3fs at it, the bucket `BUCKET` made; yields a boto3 client"
    pytest.importorskip('s3fs'); server = pytest.importorskip('moto.server')
    import boto3
    logging.getLogger('werkzeug').setLevel(logging.WARNING)   # one log line per request otherwise
    with socket.socket() as so: so.bind(('127.0.0.1', 0)); port = so.getsockname()[1]
    srv = server.ThreadedMotoServer(ip_address='127.0.0.1', port=port, verbose=False)
    srv.start()
    home = tmp_path_factory.mktemp('home')
    env = dict(AWS_ACCESS_KEY_ID='testing', AWS_SECRET_ACCESS_KEY='testing', AWS_DEFAULT_REGION='us-east-1',
               AWS_ENDPOINT_URL=f'http://127.0.0.1:{port}', AWS_CONFIG_FILE=str(home/'config'),
               AWS_SHARED_CREDENTIALS_FILE=str(home/'credentials'), FASTAI_MEMMAP_CACHE=str(home/'cache'))
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in ('AWS_PROFILE', 'AWS_SESSION_TOKEN', 'AWS_ENDPOINT_URL_S3'): mp.delenv(k, raising=False)
            for k, v in env.items(): mp.setenv(k, v)
            client = boto3.client('s3')
            client.create_bucket(Bucket=BUCKET)
            yield client
    finally: srv.stop()

class Lines:
    "The lines child process `p` writes to its stdout, each read within a deadline"
    def __init__(self, p, who:str='the child process'): self.p, self.fd, self.buf, self.who = p, p.stdout.fileno(), b'', who

    @property
    def has_line(self) -> bool: return b'\n' in self.buf

    def pump(self):
        "Read what has arrived, without blocking"
        if select.select([self.fd], [], [], 0)[0]: self.buf += os.read(self.fd, 1 << 16)

    def ready(self, delay:float) -> bool:
        "Whether a line is here, or output arrives within `delay` seconds"
        return self.has_line or bool(select.select([self.fd], [], [], delay)[0])

    def __call__(self, timeout:float=60) -> str:
        deadline = time.monotonic() + timeout
        while not self.has_line:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]: raise TimeoutError(f"{self.who} did not report")
            chunk = os.read(self.fd, 1 << 16)
            if not chunk: raise EOFError(f"{self.who} died (rc {self.p.poll()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b'\n', 1)
        return line.decode()
