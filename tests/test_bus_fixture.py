def test_private_bus_answers(system_bus):
    out = system_bus.busctl("list", "--no-legend").stdout
    assert "org.freedesktop.DBus" in out
