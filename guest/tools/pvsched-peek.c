// SPDX-License-Identifier: GPL-2.0
/*
 * pvsched-peek - reads the pvsched shared region from guest user space through the
 * module's /dev/pvsched (a read-only mmap of the whole region) and prints the host
 * header and every host line, each copied under its seqlock.
 *
 *   cc -O2 -Wall -Wextra -I guest/kmod -o pvsched-peek guest/tools/pvsched-peek.c
 *   pvsched-peek                    header and host lines
 *   pvsched-peek --check-refusals   also checks that every way to write is refused
 *
 * Reading a host line consistently (the host publishes it under a seqlock):
 *   1. load seq with acquire ordering; if it is odd the host is writing: retry;
 *   2. copy the payload (pcpu as a u32, then the seven u64 words after it);
 *   3. an acquire fence, then load seq again: equal to the first load means the copy is
 *      one publish; otherwise retry (bounded: a stuck host must not hang the reader).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "pvsched_abi.h"

#define DEVICE "/dev/pvsched"
#define REGION_SIZE "/sys/class/misc/pvsched/region_size"
#define READ_ATTEMPTS 1000

/* Copies the host line at `src` under its seqlock; 0 on success, -1 when always torn. */
static int read_host_line(const void *src, struct PvschedHostLine *out)
{
	const uint32_t *seq = src;
	const uint32_t *pcpu = seq + 1;
	const uint64_t *words = (const uint64_t *)((const char *)src + 8);
	uint64_t copy[8];
	int attempt, i;

	for (attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
		uint32_t before = __atomic_load_n(seq, __ATOMIC_ACQUIRE);
		uint32_t cpu;

		if (before & 1)
			continue;
		cpu = __atomic_load_n(pcpu, __ATOMIC_RELAXED);
		for (i = 0; i < 7; i++)
			copy[i + 1] = __atomic_load_n(&words[i], __ATOMIC_RELAXED);
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		if (__atomic_load_n(seq, __ATOMIC_RELAXED) != before)
			continue;
		copy[0] = (uint64_t)before | ((uint64_t)cpu << 32);
		memcpy(out, copy, sizeof(*out));
		return 0;
	}
	return -1;
}

static long region_size(void)
{
	char buf[32];
	FILE *f = fopen(REGION_SIZE, "r");
	long size = -1;

	if (!f)
		return -1;
	if (fgets(buf, sizeof(buf), f))
		size = strtol(buf, NULL, 10);
	fclose(f);
	return size;
}

/* Reports one attempt to write: refused is right, accepted is a failure. */
static int expect_refused(const char *what, int failed, int err)
{
	if (failed) {
		printf("refused: %s (%s)\n", what, strerror(err));
		return 0;
	}
	printf("ACCEPTED: %s\n", what);
	return 1;
}

static int check_refusals(int fd, void *map, long len)
{
	long page = sysconf(_SC_PAGESIZE);
	int bad = 0, rw;
	void *p;

	rw = open(DEVICE, O_RDWR);
	bad += expect_refused("open O_RDWR", rw < 0, errno);
	if (rw >= 0)
		close(rw);

	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	bad += expect_refused("private writable mmap", p == MAP_FAILED, errno);
	if (p != MAP_FAILED)
		munmap(p, len);

	bad += expect_refused("mprotect PROT_WRITE", mprotect(map, page, PROT_READ | PROT_WRITE) != 0,
			      errno);

	p = mmap(NULL, len + page, PROT_READ, MAP_SHARED, fd, 0);
	bad += expect_refused("mmap past the end", p == MAP_FAILED, errno);
	if (p != MAP_FAILED)
		munmap(p, len + page);

	p = mmap(NULL, page, PROT_READ, MAP_SHARED, fd, len);
	bad += expect_refused("mmap at an offset past the end", p == MAP_FAILED, errno);
	if (p != MAP_FAILED)
		munmap(p, page);
	return bad;
}

int main(int argc, char **argv)
{
	int refusals = argc > 1 && !strcmp(argv[1], "--check-refusals");
	const struct PvschedHeaderHost *h;
	struct PvschedHostLine line;
	long len = region_size();
	uint32_t slot, nr_slots;
	int fd, bad = 0;
	void *map;

	if (len < (long)sizeof(struct PvschedHeader)) {
		fprintf(stderr, "pvsched-peek: no usable %s\n", REGION_SIZE);
		return 2;
	}
	fd = open(DEVICE, O_RDONLY);
	if (fd < 0) {
		perror("pvsched-peek: " DEVICE);
		return 2;
	}
	map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED) {
		perror("pvsched-peek: mmap");
		return 2;
	}
	h = map;
	if (__atomic_load_n(&h->magic, __ATOMIC_RELAXED) != PVSCHED_MAGIC) {
		printf("magic=bad (the host has not formatted the region)\n");
		return 1;
	}
	nr_slots = h->nr_slots;
	/* The header is host-written: bound the walk by the mapping, not by its word. */
	if ((uint64_t)PVSCHED_HEADER_SIZE + (uint64_t)nr_slots * PVSCHED_SLOT_SIZE > (uint64_t)len)
		nr_slots = 0;
	printf("magic=ok version=%u.%u nr_slots=%u host_generation=%u host_features=%#llx region_size=%ld\n",
	       h->version_major, h->version_minor, h->nr_slots, h->host_generation,
	       (unsigned long long)h->host_features, len);
	for (slot = 0; slot < nr_slots; slot++) {
		const char *s = (const char *)map + PVSCHED_HEADER_SIZE +
				(size_t)slot * PVSCHED_SLOT_SIZE + PVSCHED_LINE_SIZE;

		if (read_host_line(s, &line)) {
			printf("cpu%u torn\n", slot);
			continue;
		}
		printf("cpu%u seq=%u pcpu=%u boost_state=%u preempted=%u pcpu_load_permille=%u steal_ns=%llu host_time_ns=%llu\n",
		       slot, line.seq, line.pcpu, line.boost_state, line.preempted,
		       line.pcpu_load_permille, (unsigned long long)line.steal_ns,
		       (unsigned long long)line.host_time_ns);
	}
	if (refusals)
		bad = check_refusals(fd, map, len);
	munmap(map, len);
	close(fd);
	return bad ? 1 : 0;
}
