/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * pinlab: user-space ABI of /dev/pinlabN.
 *
 * Every structure has a fixed size and explicit padding; padding must be
 * zero on input (else -EINVAL) and is zero on output.  Fields marked "out"
 * are ignored on input and written by the kernel; the structure is copied
 * back even when the ioctl fails, so after a device error the raw device
 * status (PINLAB_STATUS_*) is available next to the errno:
 *   PAGE_FAULT -EFAULT, DMA_ERROR -EIO, ABORTED -ECANCELED, BAD_ARG -EINVAL,
 *   NO_REGION -ENOENT, EXISTS -EEXIST, NO_SPACE -ENOSPC, BAD_OPCODE
 *   -EOPNOTSUPP, TIMEOUT -ETIMEDOUT (device was reset), NO_DEVICE -ENODEV.
 * A region whose device state was lost by a reset fails with -EIO
 * (status ABORTED); QUERY reports it as PINLAB_STATE_FAILED.
 */
#ifndef _UAPI_PINLAB_H
#define _UAPI_PINLAB_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define PINLAB_IOC_MAGIC	'P'

/* pin modes (struct pinlab_register.mode) */
#define PINLAB_MODE_GUP		0	/* get_user_pages(), put_page() */
#define PINLAB_MODE_PIN		1	/* pin_user_pages() */
#define PINLAB_MODE_LONGTERM	2	/* pin_user_pages(FOLL_LONGTERM) */
#define PINLAB_MODE_ODP		3	/* no pin: mmu notifier + hmm */

/* struct pinlab_register.flags */
#define PINLAB_REG_READONLY	0x1U	/* no FOLL_WRITE, device read-only */
#define PINLAB_REG_FAST		0x2U	/* gup/pin/longterm: *_user_pages_fast() */
#define PINLAB_REG_FLAGS_ALL	(PINLAB_REG_READONLY | PINLAB_REG_FAST)

/*
 * struct pinlab_query.gup_path: the call that took the region's pages.
 * FAST is the lockless page-table walk with its own fallback to the slow
 * path for pages it cannot take (mm/gup.c); the module cannot tell which
 * pages fell back, only which entry point it called.
 */
#define PINLAB_GUP_PATH_NONE	0	/* odp: nothing pinned */
#define PINLAB_GUP_PATH_SLOW	1	/* get/pin_user_pages(), mmap_read_lock */
#define PINLAB_GUP_PATH_FAST	2	/* get/pin_user_pages_fast() */

/* limits */
#define PINLAB_MAX_REGION_BYTES	0x40000000ULL	/* 1 GiB */

/* raw device status codes (REGISTERS.md) */
#define PINLAB_STATUS_OK		0
#define PINLAB_STATUS_BAD_OPCODE	1
#define PINLAB_STATUS_BAD_ARG		2
#define PINLAB_STATUS_NO_REGION		3
#define PINLAB_STATUS_EXISTS		4
#define PINLAB_STATUS_DMA_ERROR		5
#define PINLAB_STATUS_PAGE_FAULT	6
#define PINLAB_STATUS_ABORTED		7
#define PINLAB_STATUS_NO_SPACE		8
/* driver-side pseudo statuses (never sent by the device) */
#define PINLAB_STATUS_TIMEOUT		0xfffe
#define PINLAB_STATUS_NO_DEVICE		0xffff

/* region states (struct pinlab_query.state) */
#define PINLAB_STATE_ACTIVE	0
#define PINLAB_STATE_FAILED	1	/* device reset or removed */

/* REGISTER: in addr, len, mode, flags; out region, status */
struct pinlab_register {
	__u64 addr;
	__u64 len;
	__u32 mode;
	__u32 flags;
	__u32 region;
	__u16 status;
	__u16 pad;
};

/* DEREGISTER, STREAM_STOP, DIRTY, FENCE */
struct pinlab_region_op {
	__u32 region;		/* in; must be 0 for FENCE */
	__u16 status;		/* out */
	__u16 pad;
	__u64 result;		/* out: STREAM_STOP chunks, DIRTY pages */
};

/* DMA_WRITE, DMA_READ */
struct pinlab_dma {
	__u32 region;		/* in */
	__u32 generation;	/* in: DMA_WRITE 1..65535; must be 0 for READ */
	__u64 offset;		/* in: bytes into the region */
	__u64 len;		/* in: bytes */
	__u64 bytes;		/* out: bytes written / read; on a device
				 * error the completion's result0 (PAGE_FAULT:
				 * page index, DMA_ERROR: the address)
				 */
	__u32 crc32;		/* out: DMA_READ zlib crc32 */
	__u16 status;		/* out */
	__u16 pad;
};

/* STREAM_START */
struct pinlab_stream {
	__u32 region;
	__u32 generation;	/* first generation, 1..65535 */
	__u64 offset;
	__u64 len;
	__u32 chunk;		/* bytes, 8-multiple, 0 = 4096 */
	__u32 interval_us;
	__u16 status;		/* out */
	__u16 pad[3];
};

/* QUERY: in region; everything else out */
struct pinlab_query {
	__u32 region;
	__u32 mode;
	__u32 flags;
	__u32 state;
	__u64 addr;
	__u64 len;
	__u64 pages;
	__u64 pinned;		/* pages pinned (gup/pin/longterm) or mapped (odp) */
	__u64 maybe_dma_pinned;	/* pages with folio_maybe_dma_pinned() now */
	__u64 invalidations;	/* odp: notifier invalidations hitting mapped pages */
	__u64 faults;		/* device page-fault events + PAGE_FAULT completions */
	__u16 last_status;	/* last non-OK device status on this region */
	__u16 gup_path;		/* PINLAB_GUP_PATH_* */
	__u16 pad[2];
};

#define PINLAB_IOC_REGISTER	_IOWR(PINLAB_IOC_MAGIC, 1, struct pinlab_register)
#define PINLAB_IOC_DEREGISTER	_IOWR(PINLAB_IOC_MAGIC, 2, struct pinlab_region_op)
#define PINLAB_IOC_DMA_WRITE	_IOWR(PINLAB_IOC_MAGIC, 3, struct pinlab_dma)
#define PINLAB_IOC_DMA_READ	_IOWR(PINLAB_IOC_MAGIC, 4, struct pinlab_dma)
#define PINLAB_IOC_STREAM_START	_IOWR(PINLAB_IOC_MAGIC, 5, struct pinlab_stream)
#define PINLAB_IOC_STREAM_STOP	_IOWR(PINLAB_IOC_MAGIC, 6, struct pinlab_region_op)
#define PINLAB_IOC_QUERY	_IOWR(PINLAB_IOC_MAGIC, 7, struct pinlab_query)
#define PINLAB_IOC_DIRTY	_IOWR(PINLAB_IOC_MAGIC, 8, struct pinlab_region_op)
#define PINLAB_IOC_FENCE	_IOWR(PINLAB_IOC_MAGIC, 9, struct pinlab_region_op)

#endif /* _UAPI_PINLAB_H */
