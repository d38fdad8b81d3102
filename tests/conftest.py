"Fixtures shared by test modules"
import logging, socket
import pytest

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
