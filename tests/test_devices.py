"""Device descriptions: shipped files load; bad values are rejected with the field and the allowed range."""

from __future__ import annotations

import pytest
import yaml
from conftest import shipped_dict, tiny_cannula_dict

from ccm.devices import CannulaDevice, DeviceError, WindowDevice, device_from_dict, fingerprint, load_device


def test_shipped_devices_load_by_name_and_path():
    cannula = load_device("cannula-220um")
    assert isinstance(cannula, CannulaDevice)
    assert cannula.cannula.diameter_um == 220 and cannula.sensor.shape == (256, 256) and cannula.target.shape == (128, 128)
    assert cannula.target.depths_um == tuple(range(0, 800, 100))
    assert isinstance(load_device("window-see-through"), WindowDevice)


def test_standard_cannula_photon_budget_and_noise_match_the_spec():
    c = load_device("cannula-220um")
    assert c.sensor.bit_depth == 12 and c.sensor.read_noise_e == pytest.approx(1.5) and c.sensor.prnu == pytest.approx(0.01)
    assert c.sensor.peak_signal_e == 2000 and c.cannula.na == 0.5 and c.tissue.scattering_length_um == 150
    assert c.target.pixel_size_um == pytest.approx(1.72)


@pytest.mark.parametrize("section, field, value, words", [
    ("cannula", "na", 2.0, ["cannula.na", "less than 1.3"]),
    ("sensor", "bit_depth", 20, ["sensor.bit_depth", "less than or equal to 16"]),
    ("sensor", "read_noise_e", -1, ["sensor.read_noise_e", "greater than or equal to 0"]),
    ("tissue", "scattering_length_um", 0, ["tissue.scattering_length_um", "greater than or equal to 10"]),
])
def test_bad_value_names_field_and_allowed_range(tmp_path, section, field, value, words):
    data = shipped_dict("cannula-220um")
    data[section][field] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DeviceError) as err:
        load_device(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_inconsistent_geometry_is_explained():
    with pytest.raises(DeviceError, match="field_of_view_um.*cannot exceed diameter_um"):
        device_from_dict(tiny_cannula_dict(cannula={"field_of_view_um": 300}))
    with pytest.raises(DeviceError, match="must cover cannula.diameter_um"):
        device_from_dict(tiny_cannula_dict(sensor={"pixel_size_um": 1.0}))
    with pytest.raises(DeviceError, match="strictly increasing"):
        device_from_dict(tiny_cannula_dict(target={"depths_um": [0, 200, 100]}))


def test_unknown_field_and_wrong_kind_are_rejected():
    with pytest.raises(DeviceError, match="extra_field"):
        device_from_dict({**tiny_cannula_dict(), "extra_field": 1})
    with pytest.raises(DeviceError, match="kind"):
        device_from_dict({**tiny_cannula_dict(), "kind": "microscope"})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannula-220um"):  # lists the shipped devices
        load_device("no-such-device")
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: cannula\n  bad: [indent")
    with pytest.raises(DeviceError, match="broken.yaml.*not valid YAML"):
        load_device(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(DeviceError, match="expected a mapping"):
        load_device(listing)


def test_fingerprint_follows_physics_and_seed_not_name():
    base = device_from_dict(tiny_cannula_dict())
    renamed = device_from_dict({**tiny_cannula_dict(), "name": "other", "description": "x"})
    reseeded = device_from_dict(tiny_cannula_dict(seed=99))
    longer = device_from_dict(tiny_cannula_dict(cannula={"length_um": 13000}))
    assert fingerprint(base) == fingerprint(renamed)
    assert len({fingerprint(base), fingerprint(reseeded), fingerprint(longer)}) == 3
