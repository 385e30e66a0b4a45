#!/usr/bin/env python3
"""Feasibility probe for bench/results/hugepages.md: boots QEMU microvm (TCG) with the given
memory backend and takes N background snapshots to exec:cat>/dev/null, printing pause
(STOP->RESUME event timestamps), QEMU downtime and mappings. Kernel/initramfs globs below
are from a local FORKD_HOME; adjust. Example:
  python3 hugepages-probe.py --mem 2048 --tag hugetlb --obj "memory-backend-memfd,id=mem0,size={size},hugetlb=on,hugetlbsize=2M"
"""
import re, json, os, socket, subprocess, sys, time, glob, argparse
p = argparse.ArgumentParser()
p.add_argument('--mem', type=int, default=512)
p.add_argument('--obj', required=True, help='memory backend object, {size} substituted')
p.add_argument('--n', type=int, default=4)
p.add_argument('--boot', type=float, default=6)
p.add_argument('--tag', default='x')
a = p.parse_args()
k = glob.glob('/tmp/hp-home/kernels/*/boot/vmlinuz-*')[0]
ini = sorted(glob.glob('/tmp/fh/initramfs/*.cpio'), key=os.path.getmtime)[-1]
d = f'/tmp/hp/run-{a.tag}'; os.makedirs(d, exist_ok=True)
qmp = f'{d}/qmp.sock'
if os.path.exists(qmp): os.unlink(qmp)
obj = a.obj.format(size=f'{a.mem}M')
args = ['qemu-system-x86_64','-nodefaults','-no-user-config','-nographic','-no-reboot',
 '-machine','microvm,x-option-roms=off,isa-serial=on,rtc=on','-accel','tcg','-smp','1','-m',f'{a.mem}M',
 '-object',obj,'-machine','memory-backend=mem0','-kernel',k,'-initrd',ini,
 '-append','console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2000000 lpj=4000000',
 '-chardev',f'file,id=c0,path={d}/console.log','-serial','chardev:c0',
 '-chardev',f'socket,id=agent0,path={d}/agent.sock,server=on,wait=off','-device','virtio-serial-device','-device','virtserialport,chardev=agent0,name=org.forkd.agent','-chardev',f'socket,id=qmp0,path={qmp},server=on,wait=off','-mon','chardev=qmp0,mode=control']
t0=time.time()
q = subprocess.Popen(args, stderr=open(d+"/stderr","w"))
while not os.path.exists(qmp):
    if q.poll() is not None:
        print(json.dumps({"tag":a.tag,"error":open(d+"/stderr").read().strip()})); sys.exit(0)
    time.sleep(0.01)
s = socket.socket(socket.AF_UNIX); s.connect(qmp); f = s.makefile('rw')
f.readline()
events=[]
def cmd(c, args=None):
    m={'execute':c}
    if args: m['arguments']=args
    f.write(json.dumps(m)+'\n'); f.flush()
    while True:
        r=json.loads(f.readline())
        if 'event' in r: events.append(r); continue
        return r
def wait_event(name, to=60):
    t=time.time()
    while True:
        for e in events:
            if e['event']==name: events.remove(e); return e
        s.settimeout(to); r=json.loads(f.readline()); s.settimeout(None)
        if 'event' in r: events.append(r)
cmd('qmp_capabilities')
start_s=time.time()-t0
time.sleep(a.boot)
r=cmd('migrate-set-capabilities',{'capabilities':[{'capability':'background-snapshot','state':True}]})
if 'error' in r:
    print(json.dumps({'tag':a.tag,'error':'set-capabilities: '+r['error']['desc']})); q.kill(); sys.exit(0)
cmd('migrate-set-parameters',{'max-bandwidth':64<<30})
out=[]
def ts(e): return e['timestamp']['seconds']+e['timestamp']['microseconds']/1e6
def rss():
    st=open(f'/proc/{q.pid}/status').read()
    return {l.split(':')[0]:l.split(':')[1].strip() for l in st.splitlines() if l.startswith(('VmRSS','RssShmem','RssFile','RssAnon'))}
def pmd():
    sm=open(f'/proc/{q.pid}/smaps').read()
    tot={}
    for l in sm.splitlines():
        m=re.match(r'(ShmemPmdMapped|FilePmdMapped|Rss|Shared_Hugetlb|Private_Hugetlb):\s+(\d+)',l)
        if m: tot[m.group(1)]=tot.get(m.group(1),0)+int(m.group(2))
    mi={l.split(':')[0]:l.split(':')[1].strip() for l in open('/proc/meminfo') if l.startswith(('ShmemHugePages','HugePages_Free','Shmem:'))}
    return {**tot,**mi}
for i in range(a.n):
    events.clear()
    t=time.time()
    pre=pmd() if i==0 else None
    t1=time.time(); cmd('stop'); t2=time.time()
    r=cmd('migrate',{'uri':'exec:cat > /dev/null'}); t3=time.time()
    if 'error' in r:
        out.append({'i':i,'error':r['error']['desc']}); cmd('cont'); break
    try:
        res=wait_event('RESUME',30); st=wait_event('STOP',1)
    except Exception as e:
        m=cmd('query-migrate'); out.append({'i':i,'error':m.get('error-desc',str(e))}); cmd('cont'); break
    pause=(ts(res)-ts(st))*1000
    while True:
        try: m=cmd("query-migrate")
        except Exception as e: print("QEMU exit", q.wait(), open(d+"/stderr").read()); raise
        if m['return'].get('status') in ('completed','failed','cancelled'): break
        time.sleep(0.005)
    m=m['return']
    out.append({'i':i,'pause_ms':round(pause,1),'downtime':m.get('downtime'),'status':m['status'],'err':m.get('error-desc'),'total_ms':round((time.time()-t)*1000),'stop_cmd_ms':round((t2-t1)*1000,1),'migrate_cmd_ms':round((t3-t2)*1000,1),'pmd_before':pre,'rss':rss()['RssShmem']})
    time.sleep(0.5)
huge=pmd()
print(json.dumps({'tag':a.tag,'mem':a.mem,'obj':obj,'snaps':out,'pmd_mapped':huge}))
q.kill(); q.wait()
