// SPDX-License-Identifier: GPL-2.0
/*
 * pinlab: driver for the pinlab emulated PCI DMA engine (1de5:0001).
 * Module init/exit, PCI probe/remove, BAR0, MSI-X, debugfs.
 */
#include <linux/debugfs.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/seq_file.h>
#include <linux/slab.h>

#include "pinlab.h"

unsigned int pinlab_cmd_timeout_ms = 30000;
module_param_named(cmd_timeout_ms, pinlab_cmd_timeout_ms, uint, 0644);
MODULE_PARM_DESC(cmd_timeout_ms,
		 "Command completion timeout in ms; a timeout resets the device (default 30000)");

unsigned int pinlab_fence_timeout_ms = 5000;
module_param_named(fence_timeout_ms, pinlab_fence_timeout_ms, uint, 0644);
MODULE_PARM_DESC(fence_timeout_ms,
		 "odp INVALIDATE fence timeout in ms before escalating to a device reset (default 5000)");

static DEFINE_IDA(pinlab_dev_ida);
static struct dentry *pinlab_debugfs_root;

static void pinlab_dev_release(struct kref *kref)
{
	struct pinlab_dev *pd = container_of(kref, struct pinlab_dev, ref);

	xa_destroy(&pd->regions);
	ida_destroy(&pd->region_ida);
	ida_free(&pinlab_dev_ida, pd->index);
	pci_dev_put(pd->pdev);
	kfree(pd);
}

void pinlab_dev_get(struct pinlab_dev *pd)
{
	kref_get(&pd->ref);
}

void pinlab_dev_put(struct pinlab_dev *pd)
{
	kref_put(&pd->ref, pinlab_dev_release);
}

static const char * const pinlab_event_names[PINLAB_NR_EVENTS_STATS] = {
	[MMU_NOTIFY_UNMAP] = "unmap",
	[MMU_NOTIFY_CLEAR] = "clear",
	[MMU_NOTIFY_PROTECTION_VMA] = "protection_vma",
	[MMU_NOTIFY_PROTECTION_PAGE] = "protection_page",
	[MMU_NOTIFY_SOFT_DIRTY] = "soft_dirty",
	[MMU_NOTIFY_RELEASE] = "release",
	[MMU_NOTIFY_MIGRATE] = "migrate",
	[MMU_NOTIFY_EXCLUSIVE] = "exclusive",
};

static int pinlab_stats_show(struct seq_file *m, void *unused)
{
	struct pinlab_dev *pd = m->private;
	struct pinlab_stats *s = &pd->stats;
	unsigned int i;

	seq_printf(m, "state %d\nepoch %u\n", pd->state, pd->epoch);
	seq_printf(m, "cmds %lld\ncmd_errors %lld\ntimeouts %lld\n",
		   atomic64_read(&s->cmds), atomic64_read(&s->cmd_errors),
		   atomic64_read(&s->timeouts));
	seq_printf(m, "resets %lld\nescalations %lld\n",
		   atomic64_read(&s->resets), atomic64_read(&s->escalations));
	seq_printf(m, "events %lld\nevents_dropped %lld\nspurious_cqes %lld\n",
		   atomic64_read(&s->events), atomic64_read(&s->events_dropped),
		   atomic64_read(&s->spurious_cqes));
	seq_printf(m, "pins_held %lld\nodp_mapped %lld\nodp_faults_served %lld\n",
		   atomic64_read(&s->pins_held), atomic64_read(&s->odp_mapped),
		   atomic64_read(&s->odp_faults_served));
	seq_printf(m, "invalidations_nonblock_refused %lld\n",
		   atomic64_read(&s->invalidations_nonblock_refused));
	for (i = 0; i < PINLAB_NR_EVENTS_STATS; i++) {
		if (pinlab_event_names[i])
			seq_printf(m, "invalidations_%s %lld\n",
				   pinlab_event_names[i],
				   atomic64_read(&s->invalidations[i]));
		else if (atomic64_read(&s->invalidations[i]))
			seq_printf(m, "invalidations_event%u %lld\n", i,
				   atomic64_read(&s->invalidations[i]));
	}
	seq_printf(m, "revokes %lld\nrevoke_max_us %lld\n",
		   atomic64_read(&s->revokes),
		   atomic64_read(&s->revoke_max_us));
	/* bucket i: fences that took < 2^i us (the last one: everything) */
	for (i = 0; i < PINLAB_LAT_BUCKETS; i++)
		if (atomic64_read(&s->revoke_lat[i]))
			seq_printf(m, "revoke_latency_us_lt_%llu %lld\n",
				   i == PINLAB_LAT_BUCKETS - 1 ? U64_MAX : 1ULL << i,
				   atomic64_read(&s->revoke_lat[i]));
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pinlab_stats);

/*
 * debugfs "mark": a value written here goes to SCRATCH, which the device
 * records in its audit log in order with its DMA accesses (REGISTERS.md),
 * so a test can mark a point of the driver's timeline, such as "the
 * invalidation has returned", in the device's own log.
 */
static int pinlab_mark_set(void *data, u64 val)
{
	struct pinlab_dev *pd = data;

	writel(lower_32_bits(val), pd->bar0 + PINLAB_REG_SCRATCH);
	/* a read returns only after the write reached the device */
	(void)readl(pd->bar0 + PINLAB_REG_SCRATCH);
	return 0;
}
DEFINE_DEBUGFS_ATTRIBUTE(pinlab_mark_fops, NULL, pinlab_mark_set, "%llu\n");

/*
 * One vector for both queues: MSI without interrupt remapping gives a single
 * vector on x86, and the device then signals the event queue on vector 0 too.
 */
static irqreturn_t pinlab_shared_irq(int irq, void *data)
{
	irqreturn_t cq = pinlab_cq_irq(irq, data);
	irqreturn_t eq = pinlab_eq_irq(irq, data);

	return (cq == IRQ_HANDLED || eq == IRQ_HANDLED) ? IRQ_HANDLED : IRQ_NONE;
}

static int pinlab_setup_irqs(struct pinlab_dev *pd)
{
	struct pci_dev *pdev = pd->pdev;
	int ret;

	/*
	 * MSI-X by default; MSI when the device offers only that (it does with
	 * --irq msi, because QEMU's vfio-user-pci aborts on device_del of an
	 * MSI-X device).
	 */
	ret = pci_alloc_irq_vectors(pdev, PINLAB_MIN_VECS, PINLAB_MAX_VECS,
				    PCI_IRQ_MSIX | PCI_IRQ_MSI);
	if (ret < 0)
		return ret;
	pd->nvecs = ret;

	if (pd->nvecs < 2) {
		ret = request_irq(pci_irq_vector(pdev, PINLAB_VEC_CQ),
				  pinlab_shared_irq, 0, pd->name, pd);
		if (ret)
			goto err_vecs;
		return 0;
	}
	ret = request_irq(pci_irq_vector(pdev, PINLAB_VEC_CQ), pinlab_cq_irq,
			  0, pd->name, pd);
	if (ret)
		goto err_vecs;
	ret = request_irq(pci_irq_vector(pdev, PINLAB_VEC_EQ), pinlab_eq_irq,
			  0, pd->name, pd);
	if (ret)
		goto err_cq;
	return 0;

err_cq:
	free_irq(pci_irq_vector(pdev, PINLAB_VEC_CQ), pd);
err_vecs:
	pci_free_irq_vectors(pdev);
	return ret;
}

static void pinlab_free_irqs(struct pinlab_dev *pd)
{
	if (pd->nvecs >= 2)
		free_irq(pci_irq_vector(pd->pdev, PINLAB_VEC_EQ), pd);
	free_irq(pci_irq_vector(pd->pdev, PINLAB_VEC_CQ), pd);
	pci_free_irq_vectors(pd->pdev);
}

static int pinlab_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct pinlab_dev *pd;
	u32 magic, version;
	int ret;

	pd = kzalloc(sizeof(*pd), GFP_KERNEL);
	if (!pd)
		return -ENOMEM;
	kref_init(&pd->ref);
	pd->pdev = pci_dev_get(pdev);
	spin_lock_init(&pd->lock);
	spin_lock_init(&pd->eq_lock);
	mutex_init(&pd->reset_lock);
	init_waitqueue_head(&pd->slot_wq);
	INIT_KFIFO(pd->events);
	INIT_WORK(&pd->event_work, pinlab_event_work);
	xa_init(&pd->regions);
	ida_init(&pd->region_ida);
	pd->state = PINLAB_DEV_DEAD;

	ret = ida_alloc(&pinlab_dev_ida, GFP_KERNEL);
	if (ret < 0) {
		pci_dev_put(pdev);
		kfree(pd);
		return ret;
	}
	pd->index = ret;
	snprintf(pd->name, sizeof(pd->name), "pinlab%d", pd->index);
	pci_set_drvdata(pdev, pd);

	ret = pci_enable_device_mem(pdev);
	if (ret)
		goto err_put;
	ret = pci_request_region(pdev, 0, PINLAB_DRV_NAME);
	if (ret)
		goto err_disable;
	pd->bar0 = pci_iomap(pdev, 0, 0);
	if (!pd->bar0) {
		ret = -ENOMEM;
		goto err_release;
	}
	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (ret)
		goto err_unmap;
	pci_set_master(pdev);

	magic = readl(pd->bar0 + PINLAB_REG_ID);
	version = readl(pd->bar0 + PINLAB_REG_VERSION);
	if (magic != PINLAB_ID_MAGIC || PINLAB_VERSION_MAJOR(version) != 1) {
		dev_err(&pdev->dev, "unexpected ID %#x VERSION %#x\n", magic,
			version);
		ret = -ENODEV;
		goto err_master;
	}
	/* start from a known state */
	writel(PINLAB_CTRL_RESET, pd->bar0 + PINLAB_REG_CTRL);
	(void)readl(pd->bar0 + PINLAB_REG_STATUS);

	pd->wq = alloc_ordered_workqueue("%s_evt", 0, pd->name);
	if (!pd->wq) {
		ret = -ENOMEM;
		goto err_master;
	}
	ret = pinlab_queue_alloc(pd);
	if (ret)
		goto err_wq;
	ret = pinlab_setup_irqs(pd);
	if (ret)
		goto err_queue;
	ret = pinlab_queue_start(pd);
	if (ret)
		goto err_irqs;

	pd->misc.minor = MISC_DYNAMIC_MINOR;
	pd->misc.name = pd->name;
	pd->misc.fops = &pinlab_fops;
	pd->misc.parent = &pdev->dev;
	pd->misc.mode = 0600;
	ret = misc_register(&pd->misc);
	if (ret)
		goto err_stop;
	pd->misc_registered = true;

	pd->debugfs = debugfs_create_dir(pd->name, pinlab_debugfs_root);
	debugfs_create_file("stats", 0444, pd->debugfs, pd, &pinlab_stats_fops);
	debugfs_create_file_unsafe("mark", 0200, pd->debugfs, pd,
				   &pinlab_mark_fops);

	dev_info(&pdev->dev, "%s: version %#x, %d %s vectors\n", pd->name,
		 version, pd->nvecs, pdev->msix_enabled ? "MSI-X" : "MSI");
	return 0;

err_stop:
	pinlab_queue_kill(pd);
	writel(PINLAB_CTRL_RESET, pd->bar0 + PINLAB_REG_CTRL);
	(void)readl(pd->bar0 + PINLAB_REG_STATUS);
err_irqs:
	pinlab_free_irqs(pd);
err_queue:
	pinlab_queue_free(pd);
err_wq:
	destroy_workqueue(pd->wq);
err_master:
	pci_clear_master(pdev);
err_unmap:
	pci_iounmap(pdev, pd->bar0);
err_release:
	pci_release_region(pdev, 0);
err_disable:
	pci_disable_device(pdev);
err_put:
	pci_set_drvdata(pdev, NULL);
	pinlab_dev_put(pd);
	return ret;
}

/*
 * Open files may outlive the PCI device: their regions see the device
 * DEAD, skip device commands, and only release their mappings and pins on
 * close.  pd itself is freed with the last file.
 */
static void pinlab_remove(struct pci_dev *pdev)
{
	struct pinlab_dev *pd = pci_get_drvdata(pdev);

	if (pd->misc_registered)
		misc_deregister(&pd->misc);
	pd->misc_registered = false;
	debugfs_remove_recursive(pd->debugfs);
	pd->debugfs = NULL;

	/* stop all DMA, then fail every waiter (-ENODEV) */
	pinlab_dev_halt(pd, "remove");

	pinlab_free_irqs(pd);
	destroy_workqueue(pd->wq);	/* drains pending events */
	pd->wq = NULL;
	pinlab_queue_free(pd);
	pci_clear_master(pdev);
	pci_iounmap(pdev, pd->bar0);
	pci_release_region(pdev, 0);
	pci_disable_device(pdev);
	pci_set_drvdata(pdev, NULL);
	dev_info(&pdev->dev, "%s removed\n", pd->name);
	pinlab_dev_put(pd);
}

static const struct pci_device_id pinlab_ids[] = {
	{ PCI_DEVICE(PINLAB_VENDOR_ID, PINLAB_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, pinlab_ids);

static struct pci_driver pinlab_driver = {
	.name = PINLAB_DRV_NAME,
	.id_table = pinlab_ids,
	.probe = pinlab_probe,
	.remove = pinlab_remove,
};

static int __init pinlab_init(void)
{
	int ret;

	pinlab_debugfs_root = debugfs_create_dir(PINLAB_DRV_NAME, NULL);
	ret = pci_register_driver(&pinlab_driver);
	if (ret)
		debugfs_remove_recursive(pinlab_debugfs_root);
	return ret;
}

static void __exit pinlab_exit(void)
{
	pci_unregister_driver(&pinlab_driver);
	debugfs_remove_recursive(pinlab_debugfs_root);
	ida_destroy(&pinlab_dev_ida);
}

module_init(pinlab_init);
module_exit(pinlab_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("pinlab DMA engine driver: pinning / odp test bed");
MODULE_AUTHOR("pinlab project");
