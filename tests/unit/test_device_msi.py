"""The MSI interrupt mode (``--irq msi``): config space, regions, SET_IRQS, completions."""

from __future__ import annotations

import errno
import os
import time
import unittest

from pinlab.common import uapi as U
from pinlab.device import engine as E
from pinlab.device import protocol as P
from pinlab.device.device import Device
from pinlab.device.irq import IrqTable
from pinlab.device.pci import MSI_CAP, ConfigSpace, region_info
from pinlab.device.testclient import Driver, GuestRam, LocalServer, Rig, VfioUserError

EV = P.IRQ_SET_DATA_EVENTFD | P.IRQ_SET_ACTION_TRIGGER
OFF = P.IRQ_SET_DATA_NONE | P.IRQ_SET_ACTION_TRIGGER


class MsiModeTest(unittest.TestCase):
    def test_bad_mode_is_refused(self) -> None:
        for make in (lambda: ConfigSpace("intx"), lambda: IrqTable("msi-x"),
                     lambda: region_info(0, "x")):
            with self.assertRaises(ValueError):
                make()
        with self.assertRaises(ValueError):
            Device(irq="none")

    def test_default_is_msix(self) -> None:
        cfg = ConfigSpace()
        self.assertEqual(cfg.data[0x40], 0x11)
        self.assertEqual(region_info(P.PCI_BAR2)[1], 4096)


class MsiConfigTest(unittest.TestCase):
    def setUp(self) -> None:
        self.srv = LocalServer(irq="msi")
        self.addCleanup(self.srv.close)
        self.c = self.srv.client()
        self.addCleanup(self.c.close)
        self.c.version()

    def test_capability_layout(self) -> None:
        c = self.c
        self.assertEqual(c.cfg_read(0x06, 2) & 0x10, 0x10)  # capability list
        self.assertEqual(c.cfg_read(0x34, 1), MSI_CAP)
        self.assertEqual(c.cfg_read(MSI_CAP, 1), 0x05)  # MSI
        self.assertEqual(c.cfg_read(MSI_CAP + 1, 1), 0)  # end of list
        ctrl = c.cfg_read(MSI_CAP + 2, 2)
        self.assertEqual(ctrl & 0x0080, 0x0080)  # 64-bit address
        self.assertEqual((ctrl >> 1) & 7, 2)  # Multiple Message Capable: 4 vectors
        self.assertEqual(ctrl & 0x0100, 0)  # no per-vector masking
        self.assertEqual(ctrl & 0x71, 0)  # disabled, 1 vector enabled
        self.assertEqual(c.region_read(P.PCI_CONFIG, MSI_CAP + 4, 10), bytes(10))
        self.assertEqual(c.region_read(P.PCI_CONFIG, MSI_CAP + 14, 256 - MSI_CAP - 14),
                         bytes(256 - MSI_CAP - 14))  # nothing after the 14-byte capability

    def test_capability_masks(self) -> None:
        c, cfg = self.c, self.srv.device.pci.config
        c.cfg_write(MSI_CAP, 2, 0xFFFF)  # id and next are read-only
        self.assertEqual(c.cfg_read(MSI_CAP, 2), 0x0005)
        c.cfg_write(MSI_CAP + 2, 2, 0xFFFF)
        self.assertEqual(c.cfg_read(MSI_CAP + 2, 2), 0x0080 | 0x0004 | 0x0070 | 1)
        self.assertTrue(cfg.msi_enabled)
        self.assertFalse(cfg.msix_enabled)
        c.cfg_write(MSI_CAP + 2, 2, 0x0010 | 1)  # 2 vectors
        self.assertEqual(cfg.msi_vectors_enabled, 2)
        c.cfg_write(MSI_CAP + 4, 4, 0xFFFFFFFF)
        self.assertEqual(c.cfg_read(MSI_CAP + 4, 4), 0xFFFFFFFC)
        c.cfg_write(MSI_CAP + 8, 4, 0x12345678)
        self.assertEqual(c.cfg_read(MSI_CAP + 8, 4), 0x12345678)
        c.cfg_write(MSI_CAP + 12, 4, 0xFFFFFFFF)
        self.assertEqual(c.cfg_read(MSI_CAP + 12, 4), 0xFFFF)  # 16-bit data, then nothing
        c.cfg_write(MSI_CAP + 2, 2, 0)
        self.assertFalse(cfg.msi_enabled)
        self.assertEqual(cfg.msi_vectors_enabled, 0)

    def test_no_bar2(self) -> None:
        c = self.c
        sizes = {i: c.region_info(i)[4] for i in range(9)}
        self.assertEqual(sizes, {0: 8192, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 256, 8: 0})
        self.assertEqual(c.region_info(2)[1], 0)  # no flags either
        for off in (0x10, 0x18):
            c.cfg_write(off, 4, 0xFFFFFFFF)
        self.assertEqual(c.cfg_read(0x10, 4), 0xFFFFE000)  # BAR0: 8 KiB
        self.assertEqual(c.cfg_read(0x18, 4), 0)  # BAR2 not implemented
        with self.assertRaises(VfioUserError) as cm:
            c.region_read(P.PCI_BAR2, 0, 4)
        self.assertEqual(cm.exception.errno, errno.EINVAL)

    def test_irq_info(self) -> None:
        c = self.c
        self.assertEqual(c.irq_info(P.IRQ_MSI)[3], 4)
        self.assertEqual(c.irq_info(P.IRQ_MSI)[1] & P.IRQ_INFO_EVENTFD, P.IRQ_INFO_EVENTFD)
        self.assertEqual(c.irq_info(P.IRQ_MSIX)[3], 0)
        self.assertEqual(c.irq_info(P.IRQ_ERR)[3], 1)

    def test_set_irqs_msi(self) -> None:
        c, irq = self.c, self.srv.device.irq
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
        self.addCleanup(lambda: [os.close(f) for f in efds])
        c.set_irqs(P.IRQ_MSI, 0, 4, EV, [os.dup(f) for f in efds])  # QEMU's vfio_msi_enable
        self.assertEqual(irq.assigned(P.IRQ_MSI), [True] * 4)
        c.set_irqs(P.IRQ_MSI, 3, 1, OFF)  # loopback trigger
        self.assertEqual(os.eventfd_read(efds[3]), 1)
        c.set_irqs(P.IRQ_MSI, 0, 0, OFF)  # QEMU's vfio_msi_disable
        self.assertEqual(irq.assigned(P.IRQ_MSI), [False] * 4)
        c.set_irqs(P.IRQ_MSIX, 0, 0, OFF)  # QEMU disables MSI-X at reset: harmless
        for index, start, count, fds in ((P.IRQ_MSI, 0, 5, None), (P.IRQ_MSIX, 0, 1, None),
                                         (P.IRQ_MSIX, 0, 1, [os.dup(efds[0])])):
            with self.subTest(index=index, count=count):
                with self.assertRaises(VfioUserError) as cm:
                    c.set_irqs(index, start, count, EV, fds)
                self.assertEqual(cm.exception.errno, errno.EINVAL)


def settle(d: Driver, want: dict[int, int], timeout: float = 5.0) -> dict[int, int]:
    """Interrupt counts per vector once ``want`` is reached (the device raises the vector
    just after writing the entry, so a poller can see the entry first), or at timeout."""
    got = dict.fromkeys(range(4), 0)
    deadline = time.monotonic() + timeout
    while True:
        for v in got:
            got[v] += d.irq_count(v)
        if all(got[v] >= n for v, n in want.items()) or time.monotonic() > deadline:
            time.sleep(0.02)  # and nothing more arrives
            for v in got:
                got[v] += d.irq_count(v)
            return got
        time.sleep(0.002)


class MsiEngineTest(unittest.TestCase):
    def make(self, nvec: int) -> Rig:
        rig = Rig(audit=True, irq="msi", enable=False)
        self.addCleanup(rig.close)
        if nvec != 4:
            rig.client.set_irqs(P.IRQ_MSI, 0, 0, OFF)
            rig.driver.setup_msi(nvec)
        rig.driver.enable()
        return rig

    def fault_event(self, rig: Rig) -> None:
        """DMA_WRITE into an unmapped page: PAGE_FAULT completion and event."""
        d = rig.driver
        self.assertEqual(d.cmd(E.OP_CREATE_REGION, 1, 1, 1).status, E.OK)
        self.assertEqual(d.cmd(E.OP_DMA_WRITE, 1, 0, 8, 1).status, E.PAGE_FAULT)
        self.assertEqual([e.type for e in d.events()], [E.EV_PAGE_FAULT])

    def test_completion_interrupt_four_vectors(self) -> None:
        rig = self.make(4)
        d, dev = rig.driver, rig.device
        self.assertTrue(dev.pci.config.msi_enabled)
        self.assertEqual(dev.pci.config.msi_vectors_enabled, 4)
        self.assertEqual(d.cmd(E.OP_NOP).status, E.OK)
        self.assertEqual(settle(d, {E.VEC_CQ: 1}), {0: 1, 1: 0, 2: 0, 3: 0})
        self.fault_event(rig)
        # CREATE_REGION and DMA_WRITE on vector 0, the PAGE_FAULT event on vector 1
        self.assertEqual(settle(d, {0: 2, 1: 1}), {0: 2, 1: 1, 2: 0, 3: 0})
        st = dev.status()
        self.assertEqual(st["irq_mode"], "msi")
        self.assertTrue(st["msix"]["enabled"])
        self.assertEqual(st["msix"]["assigned"], [True] * 4)
        self.assertEqual(st["msix"]["triggered"][:2], [3, 1])
        self.assertEqual(st["msix"]["no_fd"], 0)

    def test_one_vector_carries_both(self) -> None:
        rig = self.make(1)
        d, dev = rig.driver, rig.device
        self.assertEqual(dev.irq.assigned(P.IRQ_MSI), [True, False, False, False])
        self.assertEqual(d.cmd(E.OP_NOP).status, E.OK)
        self.assertEqual(settle(d, {0: 1}), {0: 1, 1: 0, 2: 0, 3: 0})
        self.fault_event(rig)
        # 2 completions + the event's interrupt, all on vector 0
        self.assertEqual(settle(d, {0: 3}), {0: 3, 1: 0, 2: 0, 3: 0})
        self.assertEqual(dev.irq.dropped, 0)
        self.assertEqual(dev.irq.triggered[:2], [3, 1])

    def test_two_vectors(self) -> None:
        rig = self.make(2)
        d = rig.driver
        self.fault_event(rig)
        self.assertEqual(settle(d, {0: 2, 1: 1}), {0: 2, 1: 1, 2: 0, 3: 0})

    def test_msi_disabled_drops_interrupts(self) -> None:
        rig = self.make(4)
        rig.client.set_irqs(P.IRQ_MSI, 0, 0, OFF)
        self.assertEqual(rig.driver.cmd(E.OP_NOP).status, E.OK)  # completion still written
        deadline = time.monotonic() + 5
        while rig.device.irq.dropped < 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        self.assertEqual(rig.device.irq.dropped, 1)
        self.assertEqual(settle(rig.driver, {}), dict.fromkeys(range(4), 0))

    def test_disconnect_releases_msi_fds(self) -> None:
        rig = self.make(4)
        rig.client.close()
        dev = rig.device
        deadline = time.monotonic() + 5
        while dev.irq.assigned(P.IRQ_MSI) != [False] * 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(dev.irq.assigned(P.IRQ_MSI), [False] * 4)


class MsiBringUpTest(unittest.TestCase):
    def test_qemu_bring_up_sequence(self) -> None:
        srv = LocalServer(irq="msi")
        self.addCleanup(srv.close)
        ram = GuestRam(16 << 20)
        self.addCleanup(ram.close)
        with srv.client() as c:
            c.bring_up(ram)
            self.assertEqual(c.reg_read(U.REG_ID), U.ID_MAGIC)


if __name__ == "__main__":
    unittest.main()
