// SPDX-License-Identifier: GPL-2.0
/*
 * pinlab: /dev/pinlabN character device.  Regions belong to the open file;
 * release() deregisters everything the file still owns.
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "pinlab.h"

static int pinlab_open(struct inode *inode, struct file *file)
{
	/* misc_open() set private_data and holds misc_mtx: no remove race */
	struct miscdevice *misc = file->private_data;
	struct pinlab_dev *pd = container_of(misc, struct pinlab_dev, misc);
	struct pinlab_file *pf;

	pf = kzalloc(sizeof(*pf), GFP_KERNEL);
	if (!pf)
		return -ENOMEM;
	pinlab_dev_get(pd);
	pf->pd = pd;
	file->private_data = pf;
	return 0;
}

static int pinlab_release(struct inode *inode, struct file *file)
{
	struct pinlab_file *pf = file->private_data;
	struct pinlab_dev *pd = pf->pd;

	pinlab_region_release_all(pf);
	kfree(pf);
	pinlab_dev_put(pd);
	return 0;
}

union pinlab_ioctl_arg {
	struct pinlab_register reg;
	struct pinlab_region_op op;
	struct pinlab_dma dma;
	struct pinlab_stream stream;
	struct pinlab_query query;
};

/*
 * Copy the argument in, run the command, and copy the argument back even
 * when the command failed, so the raw device status reaches user space
 * together with the errno.
 */
static long pinlab_ioctl(struct file *file, unsigned int cmd,
			 unsigned long arg)
{
	struct pinlab_file *pf = file->private_data;
	void __user *uarg = (void __user *)arg;
	union pinlab_ioctl_arg u;
	unsigned int size = _IOC_SIZE(cmd);
	long ret;

	switch (cmd) {
	case PINLAB_IOC_REGISTER:
	case PINLAB_IOC_DEREGISTER:
	case PINLAB_IOC_DMA_WRITE:
	case PINLAB_IOC_DMA_READ:
	case PINLAB_IOC_STREAM_START:
	case PINLAB_IOC_STREAM_STOP:
	case PINLAB_IOC_QUERY:
	case PINLAB_IOC_DIRTY:
	case PINLAB_IOC_FENCE:
		break;
	default:
		return -ENOTTY;
	}
	if (WARN_ON_ONCE(size > sizeof(u)))
		return -ENOTTY;
	if (copy_from_user(&u, uarg, size))
		return -EFAULT;

	switch (cmd) {
	case PINLAB_IOC_REGISTER:
		ret = pinlab_region_register(pf, &u.reg);
		break;
	case PINLAB_IOC_DEREGISTER:
		ret = pinlab_region_deregister(pf, &u.op);
		break;
	case PINLAB_IOC_DMA_WRITE:
		ret = pinlab_region_dma(pf, &u.dma, true);
		break;
	case PINLAB_IOC_DMA_READ:
		ret = pinlab_region_dma(pf, &u.dma, false);
		break;
	case PINLAB_IOC_STREAM_START:
		ret = pinlab_region_stream_start(pf, &u.stream);
		break;
	case PINLAB_IOC_STREAM_STOP:
		ret = pinlab_region_stream_stop(pf, &u.op);
		break;
	case PINLAB_IOC_QUERY:
		ret = pinlab_region_query(pf, &u.query);
		break;
	case PINLAB_IOC_DIRTY:
		ret = pinlab_region_dirty(pf, &u.op);
		break;
	default: /* PINLAB_IOC_FENCE */
		ret = pinlab_dev_fence(pf->pd, &u.op);
		break;
	}
	if (copy_to_user(uarg, &u, size))
		return -EFAULT;
	return ret;
}

const struct file_operations pinlab_fops = {
	.owner = THIS_MODULE,
	.open = pinlab_open,
	.release = pinlab_release,
	.unlocked_ioctl = pinlab_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};
