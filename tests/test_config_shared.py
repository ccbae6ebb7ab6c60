"""
The shared level's settings (``--storage-backend s3``): from the command
line, the environment or the config file's ``storage`` section, checked at
start-up with one line naming what is wrong.
"""

import pytest

from regcache.config import ConfigError, load

S3 = {"storage-backend": "s3", "s3-endpoint": "http://seaweedfs:8333", "s3-bucket": "cache",
      "s3-access-key": "id"}
SECRET = {"REGCACHE_S3_SECRET_KEY": "secret"}


def test_local_is_the_default():
    """Without --storage-backend there is no shared level at all."""
    assert load({}, {}).shared is None


def test_s3_from_the_command_line_and_environment():
    """The bucket's settings, the secret from the environment, the defaults for the rest."""
    shared = load(S3, SECRET).shared
    assert (shared.bucket.endpoint, shared.bucket.bucket, shared.bucket.access_key) == (
        "http://seaweedfs:8333", "cache", "id")
    assert shared.bucket.secret_key == "secret"
    assert (shared.bucket.region, shared.bucket.prefix, shared.redirect, shared.lease_ttl) == (
        "us-east-1", "", False, 30.0)
    assert "secret" not in repr(shared)


def test_secret_from_a_file(tmp_path):
    """--s3-secret-key-file, the way a mounted Secret gives it."""
    f = tmp_path / "secret"
    f.write_text("from-file\n")
    assert load({**S3, "s3-secret-key-file": str(f)}, {}).shared.bucket.secret_key == "from-file"


def test_the_config_file_section(tmp_path):
    """The file's storage section, with the command line winning over it."""
    f = tmp_path / "regcache.yaml"
    f.write_text(
        "upstreams:\n  - {name: hub, urls: [https://registry-1.docker.io]}\n"
        "storage:\n  backend: s3\n  advertise: http://10.1.2.3:5000\n"
        "  s3: {endpoint: 'https://storage.googleapis.com', bucket: team-cache, region: auto, access_key: GOOG1,"
        " redirect: true, max_size: 2Ti, prefix: regcache/}\n"
        "  leases: {ttl: 10s}\n")
    shared = load({"config": str(f), "s3-bucket": "other"}, SECRET).shared
    assert shared.bucket.bucket == "other"
    assert shared.bucket.gcs and shared.redirect and shared.lease_ttl == 10.0
    assert (shared.max_size, shared.advertise, shared.bucket.prefix) == (2 * 2**40, "http://10.1.2.3:5000",
                                                                        "regcache/")


@pytest.mark.parametrize("cli, env, fragment", [
    ({"storage-backend": "nfs"}, {}, "--storage-backend"),
    ({**S3, "s3-endpoint": None}, SECRET, "--s3-endpoint: needed"),
    ({**S3, "s3-bucket": None}, SECRET, "--s3-bucket: needed"),
    (S3, {}, "--s3-secret-key-file: needed"),
    ({**S3, "s3-endpoint": "ftp://x"}, SECRET, r"--s3-endpoint: not an http\(s\) URL"),
    ({**S3, "advertise": "10.0.0.1:5000"}, SECRET, "--advertise"),
    ({**S3, "redis": "http://redis"}, SECRET, "--redis"),
    ({**S3, "lease-ttl": "0s"}, SECRET, "--lease-ttl"),
    ({**S3, "s3-secret-key-file": "/nonexistent/secret"}, {}, "--s3-secret-key-file: cannot read"),
])
def test_bad_settings_name_the_setting(cli, env, fragment):
    """Each mistake stops start-up with the option it concerns."""
    with pytest.raises(ConfigError, match=fragment):
        load(cli, env)


def test_the_environment_wins_over_the_files_secret_key_file(tmp_path):
    """
    The schema says the command line and the environment win over the
    file's keys.  With the access key from the environment (AWS_ACCESS_KEY_ID,
    as many pods get it) and the secret there too, the file's
    secret_key_file must not pair its secret with the environment's key id:
    a mismatched pair is refused by the store on every request.
    """
    secret = tmp_path / "secret"
    secret.write_text("file-secret\n")
    f = tmp_path / "regcache.yaml"
    f.write_text(
        "upstreams:\n  - {name: hub, urls: [https://registry-1.docker.io]}\n"
        "storage:\n  backend: s3\n"
        f"  s3: {{endpoint: 'http://seaweedfs:8333', bucket: cache, access_key: file-id, secret_key_file: {secret}}}\n")
    shared = load({"config": str(f)}, {"AWS_ACCESS_KEY_ID": "env-id", "AWS_SECRET_ACCESS_KEY": "env-secret"}).shared
    assert (shared.bucket.access_key, shared.bucket.secret_key) == ("env-id", "env-secret")
